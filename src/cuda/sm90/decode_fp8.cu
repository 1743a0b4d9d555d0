// The fp8-cache instantiations of the decode kernel (SnapMLA's FP8 path).
#include "cuda/sm90/decode_launch.cuh"

namespace snapmla::cuda::sm90 {

void launch_decode_fp8(const DecodeKernelParams& params, int row_groups, cudaStream_t stream) {
  launch_decode_for_format<KvFormat::kFP8>(params, row_groups, stream);
}

}  // namespace snapmla::cuda::sm90

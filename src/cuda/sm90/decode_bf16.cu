// The bf16-cache instantiations of the decode kernel (a translation unit of
// their own so the two formats compile in parallel).
#include "cuda/sm90/decode_launch.cuh"

namespace snapmla::cuda::sm90 {

void launch_decode_bf16(const DecodeKernelParams& params, int row_groups, cudaStream_t stream) {
  launch_decode_for_format<KvFormat::kBF16>(params, row_groups, stream);
}

}  // namespace snapmla::cuda::sm90

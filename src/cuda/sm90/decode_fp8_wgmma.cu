// Launch of the sm_90a wgmma fp8 decode kernel (decode_wgmma_kernel.cuh).
#include "cuda/check.h"
#include "cuda/sm90/decode_launch.cuh"
#include "cuda/sm90/decode_wgmma_kernel.cuh"

namespace snapmla::cuda::sm90 {

void launch_decode_fp8_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  using wgmma_decode::Smem;
  auto* kernel = &wgmma_decode::mla_decode_fp8_wgmma_kernel;
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kAllocBytes));
  const dim3 grid((params.rows + wgmma_decode::kRows - 1) / wgmma_decode::kRows, params.num_parts);
  kernel<<<grid, wgmma_decode::kThreads, Smem::kAllocBytes, stream>>>(params);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

}  // namespace snapmla::cuda::sm90

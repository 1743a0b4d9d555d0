// Launch of the sm_90a wgmma bf16 decode kernel (decode_bf16_wgmma_kernel.cuh).
#include "cuda/check.h"
#include "cuda/sm90/decode_bf16_wgmma_kernel.cuh"
#include "cuda/sm90/decode_launch.cuh"

namespace snapmla::cuda::sm90 {

void launch_decode_bf16_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  using bf16_wgmma_decode::Smem;
  auto* kernel = &bf16_wgmma_decode::mla_decode_bf16_wgmma_kernel;
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kAllocBytes));
  const dim3 grid((params.rows + bf16_wgmma_decode::kRows - 1) / bf16_wgmma_decode::kRows, params.num_parts);
  kernel<<<grid, bf16_wgmma_decode::kThreads, Smem::kAllocBytes, stream>>>(params);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

}  // namespace snapmla::cuda::sm90

// Launch of the sm_90a wgmma bf16 decode kernel (decode_bf16_wgmma_kernel.cuh).
#include "cuda/sm90/decode_bf16_wgmma_kernel.cuh"
#include "cuda/sm90/decode_launch.cuh"
#include "cuda/sm90/tensor_maps.h"

namespace snapmla::cuda::sm90 {

void launch_decode_bf16_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  using namespace bf16_wgmma_decode;
  // A pool TMA cannot address goes the cp.async way.
  const bool tma = pool_fits_tma(params);
  launch_wgmma_decode(tma ? &mla_decode_bf16_wgmma_kernel<true> : &mla_decode_bf16_wgmma_kernel<false>, kRows,
                      kThreads, Smem::kAllocBytes, params, tma ? bf16_cache_map(params) : CUtensorMap{}, stream);
}

}  // namespace snapmla::cuda::sm90

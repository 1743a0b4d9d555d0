// Launch of the sm_90a wgmma fp8 decode kernel (decode_wgmma_kernel.cuh).
#include <cstdlib>
#include <string>

#include "cuda/check.h"
#include "cuda/sm90/decode_launch.cuh"
#include "cuda/sm90/decode_wgmma_kernel.cuh"
#include "snapmla/error.h"

namespace snapmla::cuda::sm90 {

namespace {
// The producer variants of the kernel (decode_wgmma_kernel.cuh, run_producer),
// for A/B runs on the device: SNAPMLA_FP8_PRODUCER=v7 (producer waits for its
// copies), v8 (asynchronous arrivals + L2 prefetch), async (asynchronous
// arrivals only), prefetch (L2 prefetch only). Read once.
using KernelPointer = void (*)(DecodeKernelParams);
KernelPointer fp8_wgmma_kernel_from_environment() {
  const char* value = std::getenv("SNAPMLA_FP8_PRODUCER");
  const std::string name = value == nullptr ? "" : value;
  if (name.empty() || name == "v7") return &wgmma_decode::mla_decode_fp8_wgmma_kernel<false, false>;
  if (name == "v8") return &wgmma_decode::mla_decode_fp8_wgmma_kernel<true, true>;
  if (name == "async") return &wgmma_decode::mla_decode_fp8_wgmma_kernel<true, false>;
  if (name == "prefetch") return &wgmma_decode::mla_decode_fp8_wgmma_kernel<false, true>;
  throw Error("SNAPMLA_FP8_PRODUCER", "is '" + name + "'; expected 'v7', 'v8', 'async' or 'prefetch'");
}
}  // namespace

void launch_decode_fp8_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  using wgmma_decode::Smem;
  static const KernelPointer kernel = fp8_wgmma_kernel_from_environment();
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kAllocBytes));
  const dim3 grid((params.rows + wgmma_decode::kRows - 1) / wgmma_decode::kRows, params.num_parts);
  kernel<<<grid, wgmma_decode::kThreads, Smem::kAllocBytes, stream>>>(params);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

}  // namespace snapmla::cuda::sm90

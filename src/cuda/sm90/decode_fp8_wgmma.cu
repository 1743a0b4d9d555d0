// Launch of the sm_90a wgmma fp8 decode kernel (decode_wgmma_kernel.cuh).
#include <cstdlib>
#include <string>

#include "cuda/check.h"
#include "cuda/sm90/decode_launch.cuh"
#include "cuda/sm90/decode_wgmma_kernel.cuh"
#include "snapmla/error.h"

namespace snapmla::cuda::sm90 {
namespace {

using wgmma_decode::WgmmaVariant;

// v2 (both warpgroups compute all of S) is the proven default until v3
// (tokens split between the warpgroups) has passed the GPU tests;
// SNAPMLA_WGMMA_VARIANT=v2|v3 picks one at run time, read once.
inline constexpr WgmmaVariant kDefaultWgmmaVariant = WgmmaVariant::kSplitTokens;

WgmmaVariant wgmma_variant_from_environment() {
  const char* value = std::getenv("SNAPMLA_WGMMA_VARIANT");
  if (value == nullptr || *value == '\0') return kDefaultWgmmaVariant;
  const std::string name(value);
  if (name == "v2") return WgmmaVariant::kRedundantQk;
  if (name == "v3") return WgmmaVariant::kSplitTokens;
  throw Error("SNAPMLA_WGMMA_VARIANT", "is '" + name + "'; expected 'v2' or 'v3'");
}

template <WgmmaVariant kVariant>
void launch_variant(const DecodeKernelParams& params, cudaStream_t stream) {
  using wgmma_decode::Smem;
  auto* kernel = &wgmma_decode::mla_decode_fp8_wgmma_kernel<kVariant>;
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kAllocBytes));
  const dim3 grid((params.rows + wgmma_decode::kRows - 1) / wgmma_decode::kRows, params.num_parts);
  kernel<<<grid, wgmma_decode::kThreads, Smem::kAllocBytes, stream>>>(params);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_decode_fp8_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  static const WgmmaVariant variant = wgmma_variant_from_environment();
  if (variant == WgmmaVariant::kSplitTokens) {
    launch_variant<WgmmaVariant::kSplitTokens>(params, stream);
  } else {
    launch_variant<WgmmaVariant::kRedundantQk>(params, stream);
  }
}

}  // namespace snapmla::cuda::sm90

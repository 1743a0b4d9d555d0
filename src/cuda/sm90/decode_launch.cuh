// Launches of the decode kernel for one cache format: the row-group count
// picks the instantiation, and each one is given the dynamic shared memory it needs.
#pragma once

#include <optional>

#include "cuda/check.h"
#include "cuda/sm90/decode_kernel.cuh"
#include "cuda/sm90/dependent_launch.cuh"

namespace snapmla::cuda::sm90 {

// ---- which decode kernel runs (both cache formats) ----
// kMma: the mma.sync kernel below (for fp8, ptxas runs its e4m3 mma.sync as
// f16 HMMA on sm_90); kWgmma: the sm_90a wgmma kernels (fp8:
// decode_wgmma_kernel.cuh on the fp8 tensor cores; bf16:
// decode_bf16_wgmma_kernel.cuh).
enum class DecodeKernelChoice { kMma, kWgmma };
inline constexpr DecodeKernelChoice kDefaultDecodeKernel = DecodeKernelChoice::kWgmma;
// SNAPMLA_DECODE_KERNEL=mma|wgmma, read once (an override set below wins);
// any other value is an Error naming the variable.
DecodeKernelChoice decode_kernel_choice();
// For tests: forces a kernel; std::nullopt returns to the environment's choice.
void set_decode_kernel_override(std::optional<DecodeKernelChoice> kernel);
const char* decode_kernel_name(DecodeKernelChoice kernel);

void launch_decode_fp8_wgmma(const DecodeKernelParams& params, cudaStream_t stream);
void launch_decode_bf16_wgmma(const DecodeKernelParams& params, cudaStream_t stream);

// A wgmma decode kernel (CTAs of `rows_per_cta` query rows) with its pool's
// TMA maps (a __grid_constant__ parameter; tensor_maps.h) and the dynamic
// shared memory it needs.
template <class Maps>
void launch_wgmma_decode(void (*kernel)(DecodeKernelParams, Maps), int rows_per_cta, int threads, int smem_bytes,
                         const DecodeKernelParams& params, const Maps& maps, cudaStream_t stream) {
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const dim3 grid((params.rows + rows_per_cta - 1) / rows_per_cta, params.num_parts);
  launch_dependent(kernel, grid, dim3(threads), smem_bytes, stream, params, maps);
}

template <KvFormat kFormat, int kRowGroups>
void launch_decode_instance(const DecodeKernelParams& params, cudaStream_t stream) {
  using Smem = DecodeSmem<kFormat, kRowGroups>;
  auto* kernel = &mla_decode_kernel<kFormat, kRowGroups>;
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes));
  const dim3 grid((params.rows + Smem::kRows - 1) / Smem::kRows, params.num_parts);
  const dim3 block(kRowGroups * kWarpsPerRowGroup * 32);
  launch_dependent(kernel, grid, block, Smem::kBytes, stream, params);
}

template <KvFormat kFormat>
void launch_decode_for_format(const DecodeKernelParams& params, int row_groups, cudaStream_t stream) {
  switch (row_groups) {
    case 1: launch_decode_instance<kFormat, 1>(params, stream); break;
    case 2: launch_decode_instance<kFormat, 2>(params, stream); break;
    default: launch_decode_instance<kFormat, 4>(params, stream); break;
  }
}

}  // namespace snapmla::cuda::sm90

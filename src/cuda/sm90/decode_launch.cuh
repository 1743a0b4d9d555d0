// Launches of the decode kernel for one cache format: the row-group count
// picks the instantiation, and each one is given the dynamic shared memory it needs.
#pragma once

#include <optional>

#include "cuda/check.h"
#include "cuda/sm90/decode_kernel.cuh"

namespace snapmla::cuda::sm90 {

// ---- which fp8 decode kernel runs ----
// kMma: the mma.sync kernel below (ptxas runs its e4m3 mma.sync as f16 HMMA
// on sm_90); kWgmma: the sm_90a wgmma kernel on the fp8 tensor cores
// (decode_wgmma_kernel.cuh). bf16 caches always use the mma.sync kernel.
enum class Fp8DecodeKernel { kMma, kWgmma };
inline constexpr Fp8DecodeKernel kDefaultFp8DecodeKernel = Fp8DecodeKernel::kWgmma;
// SNAPMLA_DECODE_KERNEL=mma|wgmma, read once (an override set below wins);
// any other value is an Error naming the variable.
Fp8DecodeKernel fp8_decode_kernel();
// For tests: forces a kernel; std::nullopt returns to the environment's choice.
void set_fp8_decode_kernel_override(std::optional<Fp8DecodeKernel> kernel);
const char* fp8_decode_kernel_name(Fp8DecodeKernel kernel);

void launch_decode_fp8_wgmma(const DecodeKernelParams& params, cudaStream_t stream);

template <KvFormat kFormat, int kRowGroups>
void launch_decode_instance(const DecodeKernelParams& params, cudaStream_t stream) {
  using Smem = DecodeSmem<kFormat, kRowGroups>;
  auto* kernel = &mla_decode_kernel<kFormat, kRowGroups>;
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes));
  const dim3 grid((params.rows + Smem::kRows - 1) / Smem::kRows, params.num_parts);
  const dim3 block(kRowGroups * kWarpsPerRowGroup * 32);
  kernel<<<grid, block, Smem::kBytes, stream>>>(params);
  SNAPMLA_CUDA_CHECK_LAUNCH();
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

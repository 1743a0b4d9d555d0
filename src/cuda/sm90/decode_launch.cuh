// Launches of the decode kernel for one cache format: the row-group count
// picks the instantiation, and each one is given the dynamic shared memory it needs.
#pragma once

#include "cuda/check.h"
#include "cuda/sm90/decode_kernel.cuh"

namespace snapmla::cuda::sm90 {

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

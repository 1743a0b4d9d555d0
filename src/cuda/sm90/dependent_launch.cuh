// Programmatic dependent launch (PDL) for the decode step's kernels: a kernel
// launched this way may start while the previous kernel in the stream is
// still finishing, so the launch latency between the decode kernel and its
// combine (and between one decode call and the next) is hidden. Its CTAs must
// wait for the previous kernel's results before reading anything it wrote.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda/check.h"

namespace snapmla::cuda::sm90 {

// Called by every thread before its first read of data a previous kernel in
// the stream produced: returns once that kernel has finished and its writes
// are visible (at once when this kernel was launched without PDL).
__device__ __forceinline__ void wait_for_prior_kernel() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
// Lets the next kernel in the stream be scheduled once every CTA of this one
// has called this (or exited), instead of when this one ends. Its CTAs then
// take SM room as this kernel's CTAs exit and wait in wait_for_prior_kernel.
// The decode kernels call it (one large CTA per SM, normally one wave: no CTA
// of theirs is left waiting for room); the combine, a kernel of many small
// CTAs, must not, or the next decode's CTAs would hold SMs its remaining
// CTAs need.
__device__ __forceinline__ void release_next_kernel() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// kernel<<<grid, block, smem_bytes, stream>>>(args...) with PDL allowed.
template <class... Params, class... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, int smem_bytes, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  SNAPMLA_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace snapmla::cuda::sm90

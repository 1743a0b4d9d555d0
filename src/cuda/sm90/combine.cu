// Split-KV combine: the final out / lse of every sequence that the schedule
// cut into several pieces, as the LSE-weighted mean of the pieces' normalised
// partial outputs. Sequences with one piece were written by the decode kernel.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.h"
#include "cuda/sm90/decode_params.cuh"
#include "cuda/sm90/dependent_launch.cuh"
#include "cuda/sm90/token_quant.cuh"

namespace snapmla::cuda::sm90 {
namespace {

constexpr int kCombineRowsPerBlock = 4;  // one warp per query row
constexpr int kDimsPerLaneStep = 4;      // float4 per lane, 128 dims per warp step
constexpr int kLaneSteps = kHeadDimV / (32 * kDimsPerLaneStep);

__global__ void __launch_bounds__(kCombineRowsPerBlock * 32)
    mla_decode_combine_kernel(const DecodeKernelParams p) {
  wait_for_prior_kernel();  // the decode kernel's partials
  const int batch = blockIdx.y;
  const int row = blockIdx.x * kCombineRowsPerBlock + static_cast<int>(threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int first = p.num_splits[batch];
  const int count = p.num_splits[batch + 1] - first;
  if (count <= 1 || row >= p.rows) return;

  float max_lse2 = -__builtin_huge_valf();
  for (int s = 0; s < count; ++s)
    max_lse2 = fmaxf(max_lse2, p.partial_lse2[static_cast<int64_t>(first + s) * p.rows + row]);

  float out[kLaneSteps][kDimsPerLaneStep] = {};
  float weight_sum = 0.0f;
  if (max_lse2 != -__builtin_huge_valf()) {
    for (int s = 0; s < count; ++s) {
      const int64_t split_row = static_cast<int64_t>(first + s) * p.rows + row;
      const float weight = exp2f(p.partial_lse2[split_row] - max_lse2);  // 0 for an empty piece
      weight_sum += weight;
      if (weight == 0.0f) continue;
      const float* src = p.partial_out + split_row * kHeadDimV;
#pragma unroll
      for (int k = 0; k < kLaneSteps; ++k) {
        const float4 v = *reinterpret_cast<const float4*>(src + 128 * k + kDimsPerLaneStep * lane);
        out[k][0] = fmaf(weight, v.x, out[k][0]);
        out[k][1] = fmaf(weight, v.y, out[k][1]);
        out[k][2] = fmaf(weight, v.z, out[k][2]);
        out[k][3] = fmaf(weight, v.w, out[k][3]);
      }
    }
  }
  const float inv = weight_sum > 0.0f ? 1.0f / weight_sum : 0.0f;
  uint16_t* dst = p.out + (static_cast<int64_t>(batch) * p.rows + row) * kHeadDimV;
#pragma unroll
  for (int k = 0; k < kLaneSteps; ++k) {
    const uint2 packed = make_uint2(token_quant::bf16x2_bits(out[k][0] * inv, out[k][1] * inv),
                                    token_quant::bf16x2_bits(out[k][2] * inv, out[k][3] * inv));
    *reinterpret_cast<uint2*>(dst + 128 * k + kDimsPerLaneStep * lane) = packed;
  }
  if (lane == 0) {
    const int i = row / p.h_q, h = row % p.h_q;
    p.lse[(static_cast<int64_t>(batch) * p.h_q + h) * p.s_q + i] =
        weight_sum > 0.0f ? (max_lse2 + log2f(weight_sum)) * 0.69314718055994531f : -__builtin_huge_valf();
  }
}

}  // namespace

void launch_decode_combine(const DecodeKernelParams& params, cudaStream_t stream) {
  const dim3 grid((params.rows + kCombineRowsPerBlock - 1) / kCombineRowsPerBlock, params.batch);
  launch_dependent(mla_decode_combine_kernel, grid, dim3(kCombineRowsPerBlock * 32), 0, stream, params);
}

}  // namespace snapmla::cuda::sm90

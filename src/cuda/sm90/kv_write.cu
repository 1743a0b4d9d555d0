// Fused KV append: optional RoPE, per-token fp8 quantization (or bf16 copy)
// and the paged scatter, in one launch with one warp per token. Small
// batches (decode: 1..128 tokens) cost one launch, no sync, no allocation.
//
// Guards (the kernel never writes outside the pool, whatever the indices):
//   - slot -1 is "skip"; any other slot outside [0, num_pages * 64) is
//     skipped as well and not counted (api.cpp can only check CPU indices);
//   - with RoPE, a position outside [0, cos_sin rows) skips the token;
//   - a token with a non-finite c_kv or k_pe value (or rotated k_pe) is not
//     written and increments options.nonfinite_count (when given).
// The CPU backend raises an Error for each of these cases instead.
#include <cuda_runtime.h>

#include "cuda/backend.h"
#include "cuda/check.h"
#include "cuda/sm90/token_quant.cuh"

namespace snapmla::cuda {
namespace {

using namespace token_quant;

struct WriteInputs {
  const void* c_kv = nullptr;  // bf16 bits or f32
  int64_t c_kv_row_stride = 0;
  const void* k_pe = nullptr;
  int64_t k_pe_row_stride = 0;
  const void* slots = nullptr;
  bool slots_int64 = false;
  int64_t num_tokens = 0;
  RopeStyle rope = RopeStyle::kNone;
  const void* positions = nullptr;
  bool positions_int64 = false;
  const float* cos_sin = nullptr;
  int64_t cos_sin_row_stride = 0;
  int64_t num_positions = 0;
  int* nonfinite_count = nullptr;
};

// Rotates this lane's 8 RoPE values in place. `partner` is the chunk 32
// dims away (used by the NeoX style). The expressions are the CPU
// reference's, with every operation rounded on its own (no FMA contraction),
// so the two agree bit for bit.
__device__ __forceinline__ void apply_rope(RopeStyle style, int lane, float (&r)[kRopePerLane],
                                           const float (&partner)[kRopePerLane], const float* cos_sin_row) {
  constexpr int kHalf = kRopeDim / 2;  // cos in [0, 32), sin in [32, 64)
  if (style == RopeStyle::kInterleaved) {
#pragma unroll
    for (int p = 0; p < kRopePerLane / 2; ++p) {
      const int i = (kRopePerLane / 2) * lane + p;
      const float c = __ldg(cos_sin_row + i), s = __ldg(cos_sin_row + kHalf + i);
      const float x = r[2 * p], y = r[2 * p + 1];
      r[2 * p] = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s));
      r[2 * p + 1] = __fadd_rn(__fmul_rn(y, c), __fmul_rn(x, s));
    }
  } else {  // kNeox: dims (i, i + 32) rotate together; lanes 0..3 hold x, lanes 4..7 hold y
    const bool holds_x = lane < kRopeLanes / 2;
#pragma unroll
    for (int p = 0; p < kRopePerLane; ++p) {
      const int i = kRopePerLane * (lane % (kRopeLanes / 2)) + p;
      const float c = __ldg(cos_sin_row + i), s = __ldg(cos_sin_row + kHalf + i);
      if (holds_x) {
        const float x = r[p], y = partner[p];
        r[p] = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s));
      } else {
        const float x = partner[p], y = r[p];
        r[p] = __fadd_rn(__fmul_rn(y, c), __fmul_rn(x, s));
      }
    }
  }
}

// NopeT / RopeT: uint16_t (bf16 bits) or float.
template <typename NopeT, typename RopeT, KvFormat kFormat, bool kAligned>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize)
    write_kv_kernel(const WriteInputs in, const PagedCacheRows cache) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (token >= in.num_tokens) return;

  // Every branch below is uniform across the warp (one token per warp).
  const int64_t slot = load_index(in.slots, in.slots_int64, token);
  if (slot < 0 || slot >= cache.num_slots) return;
  const float* cos_sin_row = nullptr;
  if (in.rope != RopeStyle::kNone) {
    const int64_t position = load_index(in.positions, in.positions_int64, token);
    if (position < 0 || position >= in.num_positions) return;
    cos_sin_row = in.cos_sin + position * in.cos_sin_row_stride;
  }

  const NopeT* c_kv_row = static_cast<const NopeT*>(in.c_kv) + token * in.c_kv_row_stride;
  const RopeT* k_pe_row = static_cast<const RopeT*>(in.k_pe) + token * in.k_pe_row_stride;
  float nope[kNopePerLane];
  load_values<kAligned>(c_kv_row + kNopePerLane * lane, nope);
  bool finite = all_finite(nope);
  float rope[kRopePerLane] = {};
  float partner[kRopePerLane] = {};
  if (lane < kRopeLanes) {
    load_values<kAligned>(k_pe_row + kRopePerLane * lane, rope);
    finite &= all_finite(rope);
    if (in.rope == RopeStyle::kNeox)
      load_values<kAligned>(k_pe_row + kRopePerLane * (lane ^ (kRopeLanes / 2)), partner);
  }
  if (in.rope != RopeStyle::kNone && lane < kRopeLanes) {
    apply_rope(in.rope, lane, rope, partner, cos_sin_row);
    // A cos_sin row with inf/NaN (or an overflow) makes the rotated key non-finite.
    finite &= all_finite(rope);
  }
  if (!__all_sync(kFullMask, finite)) {
    if (lane == 0 && in.nonfinite_count != nullptr) atomicAdd(in.nonfinite_count, 1);
    return;
  }

  if constexpr (kFormat == KvFormat::kFP8) {
    quantize_row<kAligned>(lane, nope, rope, static_cast<uint8_t*>(cache.nope) + cache.nope_offset(slot),
                           cache.scale + cache.scale_offset(slot), cache.rope + cache.rope_offset(slot));
  } else {
    uint16_t* nope_row = static_cast<uint16_t*>(cache.nope) + cache.nope_offset(slot) + kNopePerLane * lane;
    store16<kAligned>(nope_row, pack_bf16x8(nope));
    store16<kAligned>(nope_row + 8, pack_bf16x8(nope + 8));
    if (lane < kRopeLanes)
      store16<kAligned>(cache.rope + cache.rope_offset(slot) + kRopePerLane * lane, pack_bf16x8(rope));
  }
}

template <typename NopeT, typename RopeT, KvFormat kFormat>
void launch_write(const WriteInputs& in, const PagedCacheRows& cache, bool aligned, cudaStream_t stream) {
  const dim3 grid(row_blocks(in.num_tokens)), block(kRowsPerBlock * kWarpSize);
  if (aligned)
    write_kv_kernel<NopeT, RopeT, kFormat, true><<<grid, block, 0, stream>>>(in, cache);
  else
    write_kv_kernel<NopeT, RopeT, kFormat, false><<<grid, block, 0, stream>>>(in, cache);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

template <typename NopeT, KvFormat kFormat>
void launch_write_rope_dtype(const WriteInputs& in, DType k_pe_dtype, const PagedCacheRows& cache, bool aligned,
                             cudaStream_t stream) {
  if (k_pe_dtype == DType::kBFloat16)
    launch_write<NopeT, uint16_t, kFormat>(in, cache, aligned, stream);
  else
    launch_write<NopeT, float, kFormat>(in, cache, aligned, stream);
}

template <KvFormat kFormat>
void launch_write_dtypes(const WriteInputs& in, DType c_kv_dtype, DType k_pe_dtype, const PagedCacheRows& cache,
                         bool aligned, cudaStream_t stream) {
  if (c_kv_dtype == DType::kBFloat16)
    launch_write_rope_dtype<uint16_t, kFormat>(in, k_pe_dtype, cache, aligned, stream);
  else
    launch_write_rope_dtype<float, kFormat>(in, k_pe_dtype, cache, aligned, stream);
}

}  // namespace

void write_kv_cache(const TensorView& c_kv, const TensorView& k_pe, const TensorView& slot_mapping,
                    const KvCacheView& cache, const KvWriteOptions& options, StreamHandle stream) {
  const int64_t num_tokens = c_kv.size(0);
  if (num_tokens == 0) return;
  ScopedCudaDevice device(c_kv.device.index);

  WriteInputs in;
  in.c_kv = c_kv.data;
  in.c_kv_row_stride = c_kv.stride[0];
  in.k_pe = k_pe.data;
  in.k_pe_row_stride = k_pe.stride[0];
  in.slots = slot_mapping.data;
  in.slots_int64 = slot_mapping.dtype == DType::kInt64;
  in.num_tokens = num_tokens;
  in.rope = options.rope;
  if (options.rope != RopeStyle::kNone) {
    in.positions = options.positions.data;
    in.positions_int64 = options.positions.dtype == DType::kInt64;
    in.cos_sin = static_cast<const float*>(options.cos_sin.data);
    in.cos_sin_row_stride = options.cos_sin.stride[0];
    in.num_positions = options.cos_sin.size(0);
  }
  if (options.nonfinite_count.defined()) in.nonfinite_count = options.nonfinite_count.ptr<int>();

  const PagedCacheRows rows = paged_cache_rows(cache);
  const bool aligned =
      cache_rows_aligned16(rows, cache.format) &&
      host_aligned16(c_kv.data, {c_kv.stride[0] * static_cast<int64_t>(dtype_size(c_kv.dtype))}) &&
      host_aligned16(k_pe.data, {k_pe.stride[0] * static_cast<int64_t>(dtype_size(k_pe.dtype))});
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (cache.format == KvFormat::kFP8)
    launch_write_dtypes<KvFormat::kFP8>(in, c_kv.dtype, k_pe.dtype, rows, aligned, cuda_stream);
  else
    launch_write_dtypes<KvFormat::kBF16>(in, c_kv.dtype, k_pe.dtype, rows, aligned, cuda_stream);
}

}  // namespace snapmla::cuda

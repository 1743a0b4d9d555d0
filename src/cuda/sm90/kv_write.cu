// Fused KV append: optional RoPE, per-token fp8 quantization (or bf16 copy)
// and the paged scatter, in one launch; each warp owns kTokensPerWarp tokens.
// Small batches (decode: 1..128 tokens) cost one launch, no sync, no
// allocation. For bandwidth, a warp issues every load of its tokens (rows,
// slots, positions) before it waits on any, so two rows per warp are in
// flight and no row waits behind its slot index; the quantization divides by
// the bracket of token_quant.cuh (same bytes as __fdiv_rn, a fraction of the
// instructions) and the cache rows are stored evict-first.
//
// Guards (the kernel never writes outside the pool, whatever the indices):
//   - slot -1 is "skip"; any other slot outside [0, num_pages * 64) is
//     skipped as well and not counted (api.cpp can only check CPU indices);
//   - with RoPE, a position outside [0, cos_sin rows) skips the token;
//   - a token with a non-finite c_kv or k_pe value (or rotated k_pe) is not
//     written and increments options.nonfinite_count (when given).
// The CPU backend raises an Error for each of these cases instead.
#include <cuda_runtime.h>

#include <type_traits>

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

// Two bf16 rows per warp double the bytes each warp has in flight (f32 rows
// are twice as large already, and two of them would spill). The bf16 kernels
// then use 64 registers: 4 blocks, 32 warps, 64 rows in flight per SM.
template <typename NopeT, typename RopeT>
inline constexpr int kTokensPerWarp = sizeof(NopeT) == 2 && sizeof(RopeT) == 2 ? 2 : 1;

// One token's loads, issued together before any of them is used.
template <typename NopeT, typename RopeT>
struct TokenLoads {
  RawValues<NopeT, kNopePerLane> nope;
  RawValues<RopeT, kRopePerLane> rope;  // zero on lanes >= kRopeLanes
  int64_t slot = -1;
  int64_t position = 0;
};

template <bool kAligned, typename NopeT, typename RopeT>
__device__ __forceinline__ void issue_token_loads(const WriteInputs& in, int64_t token, int lane,
                                                  TokenLoads<NopeT, RopeT>& t) {
  load_raw<kAligned>(static_cast<const NopeT*>(in.c_kv) + token * in.c_kv_row_stride + kNopePerLane * lane, t.nope);
#pragma unroll
  for (int c = 0; c < RawValues<RopeT, kRopePerLane>::kWords; ++c) t.rope.word[c] = make_uint4(0, 0, 0, 0);
  if (lane < kRopeLanes)
    load_raw<kAligned>(static_cast<const RopeT*>(in.k_pe) + token * in.k_pe_row_stride + kRopePerLane * lane, t.rope);
  t.slot = load_index(in.slots, in.slots_int64, token);
  if (in.rope != RopeStyle::kNone) t.position = load_index(in.positions, in.positions_int64, token);
}

// Every branch below is uniform across the warp (the warp owns the token).
template <typename NopeT, typename RopeT, KvFormat kFormat, bool kAligned>
__device__ __forceinline__ void write_token(const WriteInputs& in, const PagedCacheRows& cache, int lane,
                                            const TokenLoads<NopeT, RopeT>& t) {
  if (t.slot < 0 || t.slot >= cache.num_slots) return;
  const float* cos_sin_row = nullptr;
  if (in.rope != RopeStyle::kNone) {
    if (t.position < 0 || t.position >= in.num_positions) return;
    cos_sin_row = in.cos_sin + t.position * in.cos_sin_row_stride;
  }

  const uint32_t nope_abs_max = abs_max_bits(t.nope);
  uint32_t rope_abs_max = abs_max_bits(t.rope);
  float rope[kRopePerLane];
  unpack_values(t.rope, rope);
  if (in.rope != RopeStyle::kNone) {
    // The NeoX partner chunk (32 dims away) is lane ^ 4's own chunk.
    float partner[kRopePerLane] = {};
    if (in.rope == RopeStyle::kNeox) {
#pragma unroll
      for (int i = 0; i < kRopePerLane; ++i) partner[i] = __shfl_xor_sync(kFullMask, rope[i], kRopeLanes / 2);
    }
    if (lane < kRopeLanes) {
      apply_rope(in.rope, lane, rope, partner, cos_sin_row);
      // A cos_sin row with inf/NaN (or an overflow) makes the rotated key non-finite.
      rope_abs_max = max(rope_abs_max, abs_max_bits(rope));
    }
  }
  if (__reduce_max_sync(kFullMask, max(nope_abs_max, rope_abs_max)) >= kInfBits) {
    if (lane == 0 && in.nonfinite_count != nullptr) atomicAdd(in.nonfinite_count, 1);
    return;
  }

  if constexpr (kFormat == KvFormat::kFP8) {
    // All values are finite here, so the max of their magnitudes' bits is the
    // bits of the amax the CPU's fmaxf loop finds.
    const float amax = __uint_as_float(__reduce_max_sync(kFullMask, nope_abs_max));
    float nope[kNopePerLane];
    unpack_values(t.nope, nope);
    quantize_row_scaled<kAligned, /*kStreaming=*/true>(
        lane, nope, rope, fp8_scale_from_amax(amax), static_cast<uint8_t*>(cache.nope) + cache.nope_offset(t.slot),
        cache.scale + cache.scale_offset(t.slot), cache.rope + cache.rope_offset(t.slot));
  } else {
    // A finite bf16 value converts to f32 and back unchanged, so bf16 inputs
    // are copied as loaded.
    uint16_t* nope_row = static_cast<uint16_t*>(cache.nope) + cache.nope_offset(t.slot) + kNopePerLane * lane;
    if constexpr (std::is_same_v<NopeT, uint16_t>) {
      store16_hint<kAligned, true>(nope_row, t.nope.word[0]);
      store16_hint<kAligned, true>(nope_row + 8, t.nope.word[1]);
    } else {
      float nope[kNopePerLane];
      unpack_values(t.nope, nope);
      store16_hint<kAligned, true>(nope_row, pack_bf16x8(nope));
      store16_hint<kAligned, true>(nope_row + 8, pack_bf16x8(nope + 8));
    }
    if (lane < kRopeLanes) {
      uint16_t* rope_row = cache.rope + cache.rope_offset(t.slot) + kRopePerLane * lane;
      if (std::is_same_v<RopeT, uint16_t> && in.rope == RopeStyle::kNone)
        store16_hint<kAligned, true>(rope_row, t.rope.word[0]);
      else
        store16_hint<kAligned, true>(rope_row, pack_bf16x8(rope));
    }
  }
}

// NopeT / RopeT: uint16_t (bf16 bits) or float.
template <typename NopeT, typename RopeT, KvFormat kFormat, bool kAligned>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize)
    write_kv_kernel(const WriteInputs in, const PagedCacheRows cache) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t first_token =
      (static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize) * kTokensPerWarp<NopeT, RopeT>;
  TokenLoads<NopeT, RopeT> loads[kTokensPerWarp<NopeT, RopeT>];
#pragma unroll
  for (int i = 0; i < kTokensPerWarp<NopeT, RopeT>; ++i)
    if (first_token + i < in.num_tokens) issue_token_loads<kAligned>(in, first_token + i, lane, loads[i]);
#pragma unroll
  for (int i = 0; i < kTokensPerWarp<NopeT, RopeT>; ++i)
    if (first_token + i < in.num_tokens) write_token<NopeT, RopeT, kFormat, kAligned>(in, cache, lane, loads[i]);
}

template <typename NopeT, typename RopeT, KvFormat kFormat>
void launch_write(const WriteInputs& in, const PagedCacheRows& cache, bool aligned, cudaStream_t stream) {
  const int64_t tokens_per_block = kRowsPerBlock * kTokensPerWarp<NopeT, RopeT>;
  const dim3 grid(static_cast<unsigned>((in.num_tokens + tokens_per_block - 1) / tokens_per_block));
  const dim3 block(kRowsPerBlock * kWarpSize);
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

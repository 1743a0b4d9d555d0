// Shared by the sm90 cache write, gather and query quantization: the
// per-row fp8 quantization (amax over the 512 NoPE values -> scale =
// fp8_scale_from_amax -> e4m3(nope / scale) and bf16(rope / scale)), the
// paged-cache addressing of a slot, and the 16-byte access helpers.
// One warp owns one row; the lane layout is fixed here so all callers agree:
//   lane l holds NoPE values [16 l, 16 l + 16)  (one 16-byte e4m3 store)
//   lanes 0..7 hold RoPE values [8 l, 8 l + 8)   (one 16-byte bf16 store)
// The results are byte-identical to the CPU backend (src/core/numeric.h,
// docs/kv-format.md): IEEE division (__fdiv_rn) and the hardware
// round-to-nearest-even converters, which agree with the software ones for
// every non-NaN input (tests/cuda/kv_cache_test.cu checks millions of them).
//
// The divisions are the expensive part (an IEEE __fdiv_rn is ~11 instructions
// in its own branch region, and they kept the cache write issue-bound), so
// quantize_row_scaled gets the same bytes from a multiplication and fused
// corrections per value, and divides only where it cannot prove them equal;
// see RowDivisor for the argument.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "core/numeric.h"
#include "cuda/check.h"
#include "snapmla/kv_format.h"

namespace snapmla::cuda::token_quant {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;
inline constexpr int kNopePerLane = kNopeDim / kWarpSize;  // 16
inline constexpr int kRopePerLane = 8;                     // 16 bytes of bf16
inline constexpr int kRopeLanes = kRopeDim / kRopePerLane;  // 8
inline constexpr int kRowsPerBlock = 8;                     // warps per 256-thread block
static_assert(kNopePerLane == 16 && kRopeLanes == 8, "the lane layout assumes 512 + 64 dims");

// ---- 16-byte global accesses; the byte-wise variant serves views whose
// pointers or row strides are not 16-byte aligned (rare, but legal input). ----
template <bool kAligned>
__device__ __forceinline__ uint4 load16(const void* p) {
  if constexpr (kAligned) {
    return __ldg(static_cast<const uint4*>(p));
  } else {
    uint4 v;
    memcpy(&v, p, sizeof v);
    return v;
  }
}

template <bool kAligned>
__device__ __forceinline__ void store16(void* p, const uint4& v) {
  if constexpr (kAligned) {
    *static_cast<uint4*>(p) = v;
  } else {
    memcpy(p, &v, sizeof v);
  }
}

// st.global.cs (evict first): for rows nobody reads back soon (the cache rows
// a write appends), so they do not push reusable lines out of L2.
template <bool kAligned, bool kStreaming>
__device__ __forceinline__ void store16_hint(void* p, const uint4& v) {
  if constexpr (kAligned && kStreaming) {
    __stcs(static_cast<uint4*>(p), v);
  } else {
    store16<kAligned>(p, v);
  }
}

// ---- element conversions ----
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Two floats -> two e4m3 bytes (lo in the low byte), PTX cvt.rn.satfinite:
// round to nearest even, finite values saturate to +-448.
__device__ __forceinline__ uint32_t e4m3x2_bits(float lo, float hi) {
  uint16_t packed;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
  return packed;
}

// Two floats -> two bf16 (lo in the low half), round to nearest even.
__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
  uint32_t packed;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
  return packed;
}

// Two e4m3 bytes (low byte first) -> two floats. e4m3 values are exact in
// fp16, so the conversion through f16x2 is exact.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two_bytes) {
  uint32_t halves;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(static_cast<uint16_t>(two_bytes)));
  float lo, hi;
  asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"(static_cast<uint16_t>(halves & 0xffffu)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"(static_cast<uint16_t>(halves >> 16)));
  return make_float2(lo, hi);
}

// ---- loading values as float ----
// A lane's N consecutive elements as loaded (16-byte words), so a kernel can
// issue the loads of several rows before it converts or reduces any of them.
template <typename T, int N>
struct RawValues {
  static_assert((N * sizeof(T)) % 16 == 0);
  static constexpr int kWords = static_cast<int>(N * sizeof(T) / 16);
  uint4 word[kWords];
};

template <bool kAligned, typename T, int N>
__device__ __forceinline__ void load_raw(const T* src, RawValues<T, N>& raw) {
#pragma unroll
  for (int c = 0; c < RawValues<T, N>::kWords; ++c)
    raw.word[c] = load16<kAligned>(src + c * static_cast<int>(16 / sizeof(T)));
}

template <int N>
__device__ __forceinline__ void unpack_values(const RawValues<uint16_t, N>& raw, float (&out)[N]) {
#pragma unroll
  for (int c = 0; c < N / 8; ++c) {
    const uint32_t w[4] = {raw.word[c].x, raw.word[c].y, raw.word[c].z, raw.word[c].w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[8 * c + 2 * k] = bf16_lo(w[k]);
      out[8 * c + 2 * k + 1] = bf16_hi(w[k]);
    }
  }
}

template <int N>
__device__ __forceinline__ void unpack_values(const RawValues<float, N>& raw, float (&out)[N]) {
#pragma unroll
  for (int c = 0; c < N / 4; ++c) {
    out[4 * c] = __uint_as_float(raw.word[c].x);
    out[4 * c + 1] = __uint_as_float(raw.word[c].y);
    out[4 * c + 2] = __uint_as_float(raw.word[c].z);
    out[4 * c + 3] = __uint_as_float(raw.word[c].w);
  }
}

// The bits of max |v| as a float: an unsigned max of sign-cleared bits orders
// like the floats themselves, and it is >= kInfBits exactly when some value is
// inf or NaN, so one reduction gives both amax and the finiteness test.
inline constexpr uint32_t kInfBits = 0x7f800000u;

template <int N>
__device__ __forceinline__ uint32_t abs_max_bits(const RawValues<uint16_t, N>& raw) {
  uint32_t pair_max = 0;  // two bf16 magnitudes, compared lane-wise
#pragma unroll
  for (int c = 0; c < RawValues<uint16_t, N>::kWords; ++c) {
    pair_max = __vmaxu2(pair_max, raw.word[c].x & 0x7fff7fffu);
    pair_max = __vmaxu2(pair_max, raw.word[c].y & 0x7fff7fffu);
    pair_max = __vmaxu2(pair_max, raw.word[c].z & 0x7fff7fffu);
    pair_max = __vmaxu2(pair_max, raw.word[c].w & 0x7fff7fffu);
  }
  return max(pair_max & 0xffffu, pair_max >> 16) << 16;
}

template <int N>
__device__ __forceinline__ uint32_t abs_max_bits(const RawValues<float, N>& raw) {
  uint32_t m = 0;
#pragma unroll
  for (int c = 0; c < RawValues<float, N>::kWords; ++c) {
    m = max(m, raw.word[c].x & 0x7fffffffu);
    m = max(m, raw.word[c].y & 0x7fffffffu);
    m = max(m, raw.word[c].z & 0x7fffffffu);
    m = max(m, raw.word[c].w & 0x7fffffffu);
  }
  return m;
}

template <int N>
__device__ __forceinline__ uint32_t abs_max_bits(const float (&v)[N]) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) m = max(m, __float_as_uint(v[i]) & 0x7fffffffu);
  return m;
}

// N consecutive elements starting at `src` (N * sizeof(T) a multiple of 16).
template <bool kAligned, int N>
__device__ __forceinline__ void load_values(const uint16_t* src_bf16, float (&out)[N]) {
  static_assert(N % 8 == 0);
  RawValues<uint16_t, N> raw;
  load_raw<kAligned>(src_bf16, raw);
  unpack_values(raw, out);
}

template <bool kAligned, int N>
__device__ __forceinline__ void load_values(const float* src_f32, float (&out)[N]) {
  static_assert(N % 4 == 0);
  RawValues<float, N> raw;
  load_raw<kAligned>(src_f32, raw);
  unpack_values(raw, out);
}

template <int N>
__device__ __forceinline__ bool all_finite(const float (&v)[N]) {
  bool ok = true;
#pragma unroll
  for (int i = 0; i < N; ++i) ok &= is_finite_float(v[i]);
  return ok;
}

// 8 floats -> 8 bf16 (16 bytes).
__device__ __forceinline__ uint4 pack_bf16x8(const float* v) {
  return make_uint4(bf16x2_bits(v[0], v[1]), bf16x2_bits(v[2], v[3]), bf16x2_bits(v[4], v[5]),
                    bf16x2_bits(v[6], v[7]));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// ---- x / scale without a division per value ----
// The bytes must be those of e4m3(__fdiv_rn(x, s)) and bf16(__fdiv_rn(x, s)),
// i.e. of RN(t), t = x / s exactly (RN: f32 round to nearest even). Both
// paths below use y = RN(1/s) = __frcp_rn(s), once per row.
//
// NoPE (e4m3), two Markstein corrections: q0 = RN(x y),
// q_{k+1} = RN(q_k + RN(x - s q_k) y), result copysign(q2, x). Proof sketch
// (t scaled into [1, 2), s = S 2^e with integer S in [2^23, 2^24), y s = 1 + d,
// |d| <= S 2^-48): q_k + (x - s q_k) y = t + (t - q_k) d, so |t - q0| < 2^-22,
// |t - q1| <= 2^-24 + 2^-45 (the first remainder may round, the second is
// exact: a multiple of 2^(e-23) below 2^(e+1)), and the last step errs by
// |t - q1| |d| <= (2^-24 + 2^-45) S 2^-48. Every f32 rounding boundary m has
// |x - s m| >= 2^(e-24) (a nonzero multiple of it), so |t - m| >= 2^-24 / S,
// which exceeds that error when S <= 2^24 - 5: q2 = RN(t). The row condition
// below keeps that S and s in [2^-88, 2^120], so every value with |t| >= 2^-12
// has |x| >= 2^-100 (no underflow in the steps above) and every smaller one
// gives |q2| < 2^-10, i.e. e4m3 +-0 with the sign copysign takes from x,
// exactly as RN(t) does. Other rows (~1 in 10^6, and tiny or non-finite
// amax) and NaN inputs divide with __fdiv_rn.
//
// RoPE (bf16): RoPE values are not bounded by the amax, so no underflow-free
// range holds; a bracket decides instead. With below = RN(y (1 - 2^-20)) and
// above = RN(y (1 + 2^-20)), 1/s normal gives below < 1/s < above, so
// x*below <= t <= x*above (x >= 0; reversed for x < 0) and, RN and bf16
// rounding being monotone, bf16(RN(x*below)) <= bf16(RN(t)) <= bf16(RN(x*above)).
// Where the outer two agree (and are not NaN) the middle one equals them
// (zeros included: all carry the sign of x); no product error bound is used,
// so subnormal and overflowing products are covered. Elsewhere (~0.3% of
// values: bf16 inputs often divide to an exact bf16 tie) the lane divides.
struct RowDivisor {
  float scale = 1.0f, reciprocal = 1.0f;
  bool markstein_exact = false;  // the e4m3 condition above holds for this row
};

__device__ __forceinline__ RowDivisor row_divisor(float scale) {
  RowDivisor d;
  d.scale = scale;
  d.reciprocal = __frcp_rn(scale);
  d.markstein_exact =
      scale >= 0x1p-88f && scale <= 0x1p120f && (__float_as_uint(scale) & 0x7fffffu) <= 0x7ffffbu;
  return d;
}

__device__ __forceinline__ float divide_markstein(float x, const RowDivisor& d) {
  const float q0 = __fmul_rn(x, d.reciprocal);
  const float q1 = __fmaf_rn(__fmaf_rn(-q0, d.scale, x), d.reciprocal, q0);
  const float q2 = __fmaf_rn(__fmaf_rn(-q1, d.scale, x), d.reciprocal, q1);
  return copysignf(q2, x);
}

__device__ __forceinline__ uint32_t e4m3x4_markstein(const float* v, const RowDivisor& d) {
  return e4m3x2_bits(divide_markstein(v[0], d), divide_markstein(v[1], d)) |
         (e4m3x2_bits(divide_markstein(v[2], d), divide_markstein(v[3], d)) << 16);
}

__device__ __forceinline__ uint32_t e4m3x4_divided(const float* v, float scale) {
  return e4m3x2_bits(__fdiv_rn(v[0], scale), __fdiv_rn(v[1], scale)) |
         (e4m3x2_bits(__fdiv_rn(v[2], scale), __fdiv_rn(v[3], scale)) << 16);
}

// 16 values -> 16 e4m3 bytes of v / scale. False where the row condition
// fails or a value is NaN (then `codes` is to be recomputed by division).
__device__ __forceinline__ bool e4m3x16_markstein(const float (&v)[kNopePerLane], const RowDivisor& d,
                                                  uint32_t (&codes)[4]) {
  uint32_t nan_probe = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    codes[k] = e4m3x4_markstein(v + 4 * k, d);
    nan_probe |= (codes[k] & 0x7f7f7f7fu) + 0x01010101u;  // bit 7 of a byte set <=> it was 0x7f/0xff (NaN)
  }
  return (nan_probe & 0x80808080u) == 0;
}

// 8 values -> 8 bf16 of v / scale by the bracket; false where undecided.
__device__ __forceinline__ bool bf16x8_by_bracket(const float (&v)[kRopePerLane], const RowDivisor& d,
                                                  uint4& packed) {
  const float below = __fmul_rn(d.reciprocal, 1.0f - 0x1p-20f), above = __fmul_rn(d.reciprocal, 1.0f + 0x1p-20f);
  uint32_t lo[4], differ = 0, nan_probe = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    lo[k] = bf16x2_bits(__fmul_rn(v[2 * k], below), __fmul_rn(v[2 * k + 1], below));
    const uint32_t hi = bf16x2_bits(__fmul_rn(v[2 * k], above), __fmul_rn(v[2 * k + 1], above));
    differ |= lo[k] ^ hi;
    nan_probe |= (lo[k] & 0x7fff7fffu) + 0x007f007fu;  // bit 15 of a half set <=> that half > 0x7f80 (NaN)
  }
  packed = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  // 1/s normal (the bracket's premise): s in [2^-126, 2^120].
  const bool usable = d.scale >= 0x1p-126f && d.scale <= 0x1p120f;
  return usable && (differ | (nan_probe & 0x80008000u)) == 0;
}

// The one implementation of the fp8 row format, given the row's scale
// (fp8_scale_from_amax of the warp's amax of |nope|, as RowDivisor assumes). All 32 lanes call it with the lane
// layout above (`rope` is ignored on lanes >= 8). Writes 512 e4m3 bytes at
// nope_row, the scale at *scale_out and 64 bf16 at rope_row; kStreaming marks
// the two rows' stores evict-first (global memory only).
template <bool kAligned, bool kStreaming = false>
__device__ __forceinline__ void quantize_row_scaled(int lane, const float (&nope)[kNopePerLane],
                                                    const float (&rope)[kRopePerLane], float scale,
                                                    uint8_t* nope_row, float* scale_out, uint16_t* rope_row) {
  const RowDivisor divisor = row_divisor(scale);
  uint32_t w[4];
  bool divide = true;
  if (divisor.markstein_exact) divide = !e4m3x16_markstein(nope, divisor, w);  // uniform branch
  if (divide) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = e4m3x4_divided(nope + 4 * k, scale);
  }
  store16_hint<kAligned, kStreaming>(nope_row + kNopePerLane * lane, make_uint4(w[0], w[1], w[2], w[3]));
  if (lane < kRopeLanes) {
    uint4 packed;
    if (!bf16x8_by_bracket(rope, divisor, packed)) {
      float scaled[kRopePerLane];
#pragma unroll
      for (int i = 0; i < kRopePerLane; ++i) scaled[i] = __fdiv_rn(rope[i], scale);
      packed = pack_bf16x8(scaled);
    }
    store16_hint<kAligned, kStreaming>(rope_row + kRopePerLane * lane, packed);
  }
  if (lane == 0) *scale_out = scale;
}

// quantize_row_scaled with the scale from the row's own amax.
template <bool kAligned>
__device__ __forceinline__ void quantize_row(int lane, const float (&nope)[kNopePerLane],
                                             const float (&rope)[kRopePerLane], uint8_t* nope_row,
                                             float* scale_out, uint16_t* rope_row) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kNopePerLane; ++i) amax = fmaxf(amax, fabsf(nope[i]));
  // max is exact and order-free, so the warp tree equals the CPU's loop.
  amax = warp_max(amax);
  quantize_row_scaled<kAligned>(lane, nope, rope, fp8_scale_from_amax(amax), nope_row, scale_out, rope_row);
}

// Launches use blocks of kRowsPerBlock warps, one warp per row.
inline unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

// Where the pieces of cache slot s (page s / 64, row s % 64) live, for both
// formats: a bf16 cache's NoPE and RoPE are the two parts of its data row.
// Strides are in elements of the piece's type (e4m3 byte, bf16 or f32).
struct PagedCacheRows {
  void* nope = nullptr;  // e4m3 bytes (fp8) or bf16 (bf16)
  int64_t nope_page_stride = 0, nope_row_stride = 0;
  float* scale = nullptr;  // fp8 only
  int64_t scale_page_stride = 0, scale_row_stride = 0;
  uint16_t* rope = nullptr;  // bf16 bits
  int64_t rope_page_stride = 0, rope_row_stride = 0;
  int64_t num_slots = 0;

  __device__ __forceinline__ int64_t nope_offset(int64_t slot) const {
    return (slot / kPageSize) * nope_page_stride + (slot % kPageSize) * nope_row_stride;
  }
  __device__ __forceinline__ int64_t scale_offset(int64_t slot) const {
    return (slot / kPageSize) * scale_page_stride + (slot % kPageSize) * scale_row_stride;
  }
  __device__ __forceinline__ int64_t rope_offset(int64_t slot) const {
    return (slot / kPageSize) * rope_page_stride + (slot % kPageSize) * rope_row_stride;
  }
};

// True when `p` and every byte stride are multiples of 16, so the 16-byte
// accesses above are legal.
inline bool host_aligned16(const void* p, std::initializer_list<int64_t> byte_strides) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) return false;
  for (int64_t s : byte_strides)
    if (s % 16 != 0) return false;
  return true;
}

inline PagedCacheRows paged_cache_rows(const KvCacheView& cache) {
  PagedCacheRows rows;
  if (cache.format == KvFormat::kBF16) {
    const TensorView& d = cache.data;
    rows.nope = d.data;
    rows.nope_page_stride = rows.rope_page_stride = d.stride[0];
    rows.nope_row_stride = rows.rope_row_stride = d.stride[1];
    rows.rope = static_cast<uint16_t*>(d.data) + kNopeDim;
    rows.num_slots = d.shape[0] * kPageSize;
  } else {
    rows.nope = cache.nope.data;
    rows.nope_page_stride = cache.nope.stride[0];
    rows.nope_row_stride = cache.nope.stride[1];
    rows.scale = static_cast<float*>(cache.scale.data);
    rows.scale_page_stride = cache.scale.stride[0];
    rows.scale_row_stride = cache.scale.stride[1];
    rows.rope = static_cast<uint16_t*>(cache.rope.data);
    rows.rope_page_stride = cache.rope.stride[0];
    rows.rope_row_stride = cache.rope.stride[1];
    rows.num_slots = cache.nope.shape[0] * kPageSize;
  }
  return rows;
}

// The 16-byte accesses to the NoPE and RoPE rows of the cache are legal.
inline bool cache_rows_aligned16(const PagedCacheRows& rows, KvFormat format) {
  const int64_t nope_bytes = format == KvFormat::kBF16 ? 2 : 1;
  return host_aligned16(rows.nope, {rows.nope_page_stride * nope_bytes, rows.nope_row_stride * nope_bytes}) &&
         host_aligned16(rows.rope, {rows.rope_page_stride * 2, rows.rope_row_stride * 2});
}

// Reads entry i of an int32 or int64 index vector (slot mapping, positions, indices).
__device__ __forceinline__ int64_t load_index(const void* indices, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(indices) + i))
                  : static_cast<int64_t>(__ldg(static_cast<const int*>(indices) + i));
}

// Makes `device_index` current for the duration of a launch and restores the
// caller's device, so a view on cuda:1 works whatever device is current.
class ScopedCudaDevice {
 public:
  explicit ScopedCudaDevice(int device_index) {
    SNAPMLA_CUDA_CHECK(cudaGetDevice(&previous_));
    changed_ = previous_ != device_index;
    if (changed_) SNAPMLA_CUDA_CHECK(cudaSetDevice(device_index));
  }
  ~ScopedCudaDevice() {
    if (changed_) cudaSetDevice(previous_);  // a destructor must not throw
  }
  ScopedCudaDevice(const ScopedCudaDevice&) = delete;
  ScopedCudaDevice& operator=(const ScopedCudaDevice&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace snapmla::cuda::token_quant

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
// every non-NaN input (tests/cuda/test_kv_cache.cu checks millions of them).
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
// N consecutive elements starting at `src` (N * sizeof(T) a multiple of 16).
template <bool kAligned, int N>
__device__ __forceinline__ void load_values(const uint16_t* src_bf16, float (&out)[N]) {
  static_assert(N % 8 == 0);
#pragma unroll
  for (int c = 0; c < N / 8; ++c) {
    const uint4 v = load16<kAligned>(src_bf16 + 8 * c);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[8 * c + 2 * k] = bf16_lo(w[k]);
      out[8 * c + 2 * k + 1] = bf16_hi(w[k]);
    }
  }
}

template <bool kAligned, int N>
__device__ __forceinline__ void load_values(const float* src_f32, float (&out)[N]) {
  static_assert(N % 4 == 0);
#pragma unroll
  for (int c = 0; c < N / 4; ++c) {
    const uint4 v = load16<kAligned>(src_f32 + 4 * c);
    out[4 * c] = __uint_as_float(v.x);
    out[4 * c + 1] = __uint_as_float(v.y);
    out[4 * c + 2] = __uint_as_float(v.z);
    out[4 * c + 3] = __uint_as_float(v.w);
  }
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

// The one implementation of the fp8 row format. All 32 lanes call it with the
// lane layout above (`rope` is ignored on lanes >= 8). Writes 512 e4m3 bytes
// at nope_row, the scale at *scale_out and 64 bf16 at rope_row.
template <bool kAligned>
__device__ __forceinline__ void quantize_row(int lane, const float (&nope)[kNopePerLane],
                                             const float (&rope)[kRopePerLane], uint8_t* nope_row,
                                             float* scale_out, uint16_t* rope_row) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kNopePerLane; ++i) amax = fmaxf(amax, fabsf(nope[i]));
  // max is exact and order-free, so the warp tree equals the CPU's loop.
  amax = warp_max(amax);
  const float scale = fp8_scale_from_amax(amax);

  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t b01 = e4m3x2_bits(__fdiv_rn(nope[4 * k], scale), __fdiv_rn(nope[4 * k + 1], scale));
    const uint32_t b23 =
        e4m3x2_bits(__fdiv_rn(nope[4 * k + 2], scale), __fdiv_rn(nope[4 * k + 3], scale));
    w[k] = b01 | (b23 << 16);
  }
  store16<kAligned>(nope_row + kNopePerLane * lane, make_uint4(w[0], w[1], w[2], w[3]));
  if (lane < kRopeLanes) {
    float scaled[kRopePerLane];
#pragma unroll
    for (int i = 0; i < kRopePerLane; ++i) scaled[i] = __fdiv_rn(rope[i], scale);
    store16<kAligned>(rope_row + kRopePerLane * lane, pack_bf16x8(scaled));
  }
  if (lane == 0) *scale_out = scale;
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

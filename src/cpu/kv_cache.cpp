// CPU backend: cache writes, gathers and query quantization (the semantics the
// CUDA kernels must reproduce bit for bit; docs/kv-format.md).
#include <cmath>
#include <string>
#include <vector>

#include "core/numeric.h"
#include "cpu/backend.h"
#include "cpu/host_tensor.h"
#include "cpu/token_quant.h"
#include "snapmla/error.h"

namespace snapmla::cpu {
namespace {

void load_row(const TensorView& t, int64_t row, int width, float* dst) {
  const int64_t base = row * t.stride[0];
  const int64_t step = t.rank > 1 ? t.stride[1] : 1;
  for (int i = 0; i < width; ++i) dst[i] = static_cast<float>(load_real(t, base + i * step));
}

// Rotates one token's k_pe in place (float math, as the CUDA kernel does).
void apply_rope(RopeStyle style, const float* cos_sin_row, float* k_pe) {
  constexpr int kPairs = kRopeDim / 2;
  for (int i = 0; i < kPairs; ++i) {
    const int a = style == RopeStyle::kInterleaved ? 2 * i : i;
    const int b = style == RopeStyle::kInterleaved ? 2 * i + 1 : i + kPairs;
    const float c = cos_sin_row[i], s = cos_sin_row[kPairs + i];
    const float x = k_pe[a], y = k_pe[b];
    k_pe[a] = x * c - y * s;
    k_pe[b] = y * c + x * s;
  }
}

bool all_finite(const float* v, int n) {
  for (int i = 0; i < n; ++i)
    if (!is_finite_float(v[i])) return false;
  return true;
}

}  // namespace

void write_kv_cache(const TensorView& c_kv, const TensorView& k_pe, const TensorView& slot_mapping,
                    const KvCacheView& cache, const KvWriteOptions& options) {
  const int64_t n = c_kv.shape[0];
  const int64_t num_slots = cache.num_pages() * kPageSize;
  const bool rotate = options.rope != RopeStyle::kNone;
  const int64_t max_pos = rotate ? options.cos_sin.shape[0] : 0;

  // Everything is checked before the first write, so a bad batch leaves the
  // cache untouched.
  std::vector<float> nope(static_cast<size_t>(n) * kNopeDim), rope(static_cast<size_t>(n) * kRopeDim);
  std::vector<int64_t> slots(n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = load_integer(slot_mapping, t * slot_mapping.stride[0]);
    if (slot != -1 && (slot < 0 || slot >= num_slots))
      throw Error("slot_mapping", "token " + std::to_string(t) + " has slot " + std::to_string(slot) +
                                      ", outside [0, " + std::to_string(num_slots) + ") and not -1 (skip)");
    slots[t] = slot;
    if (slot == -1) continue;
    float* nope_t = &nope[t * kNopeDim];
    float* rope_t = &rope[t * kRopeDim];
    load_row(c_kv, t, kNopeDim, nope_t);
    load_row(k_pe, t, kRopeDim, rope_t);
    if (!all_finite(nope_t, kNopeDim))
      throw Error("c_kv", "token " + std::to_string(t) + " has a non-finite value");
    if (!all_finite(rope_t, kRopeDim))
      throw Error("k_pe", "token " + std::to_string(t) + " has a non-finite value");
    if (rotate) {
      const int64_t pos = load_integer(options.positions, t * options.positions.stride[0]);
      if (pos < 0 || pos >= max_pos)
        throw Error("positions", "token " + std::to_string(t) + " has position " + std::to_string(pos) +
                                     ", outside cos_sin's [0, " + std::to_string(max_pos) + ")");
      apply_rope(options.rope, options.cos_sin.ptr<const float>() + pos * options.cos_sin.stride[0], rope_t);
      if (!all_finite(rope_t, kRopeDim))
        throw Error("cos_sin", "row " + std::to_string(pos) + " (token " + std::to_string(t) +
                                   ") makes the rotated k_pe non-finite");
    }
  }

  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = slots[t];
    if (slot == -1) continue;
    const float* nope_t = &nope[t * kNopeDim];
    const float* rope_t = &rope[t * kRopeDim];
    if (cache.format == KvFormat::kBF16) {
      uint16_t* dst = cache.data.ptr<uint16_t>() + slot * kHeadDim;
      for (int i = 0; i < kNopeDim; ++i) dst[i] = float_to_bf16_bits(nope_t[i]);
      for (int j = 0; j < kRopeDim; ++j) dst[kNopeDim + j] = float_to_bf16_bits(rope_t[j]);
    } else {
      cache.scale.ptr<float>()[slot] = quantize_token(nope_t, rope_t, cache.nope.ptr<uint8_t>() + slot * kNopeDim,
                                                      cache.rope.ptr<uint16_t>() + slot * kRopeDim);
    }
  }
}

void gather_kv_cache(const KvCacheView& cache, const TensorView& indices, const TensorView& k_nope,
                     const TensorView& k_pe) {
  const int64_t n = indices.shape[0];
  const int64_t num_slots = cache.num_pages() * kPageSize;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = load_integer(indices, t * indices.stride[0]);
    if (slot < 0 || slot >= num_slots)
      throw Error("indices", "entry " + std::to_string(t) + " is slot " + std::to_string(slot) + ", outside [0, " +
                                 std::to_string(num_slots) + ")");
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = load_integer(indices, t * indices.stride[0]);
    uint16_t* nope_out = k_nope.ptr<uint16_t>() + t * k_nope.stride[0];
    uint16_t* rope_out = k_pe.ptr<uint16_t>() + t * k_pe.stride[0];
    if (cache.format == KvFormat::kBF16) {
      const uint16_t* src = cache.data.ptr<const uint16_t>() + slot * kHeadDim;
      for (int i = 0; i < kNopeDim; ++i) nope_out[i] = src[i];
      for (int j = 0; j < kRopeDim; ++j) rope_out[j] = src[kNopeDim + j];
    } else {
      const float scale = cache.scale.ptr<const float>()[slot];
      const uint8_t* nope = cache.nope.ptr<const uint8_t>() + slot * kNopeDim;
      const uint16_t* rope = cache.rope.ptr<const uint16_t>() + slot * kRopeDim;
      for (int i = 0; i < kNopeDim; ++i) nope_out[i] = float_to_bf16_bits(e4m3_bits_to_float(nope[i]) * scale);
      for (int j = 0; j < kRopeDim; ++j) rope_out[j] = float_to_bf16_bits(bf16_bits_to_float(rope[j]) * scale);
    }
  }
}

void quantize_query(const TensorView& q, const TensorView& q_nope, const TensorView& q_scale,
                    const TensorView& q_rope) {
  const int64_t rows = q.shape[0] * q.shape[1] * q.shape[2];
  const uint16_t* src = q.ptr<const uint16_t>();
  float row[kHeadDim];
  for (int64_t r = 0; r < rows; ++r) {
    for (int i = 0; i < kHeadDim; ++i) row[i] = bf16_bits_to_float(src[r * kHeadDim + i]);
    q_scale.ptr<float>()[r] = quantize_token(row, row + kNopeDim, q_nope.ptr<uint8_t>() + r * kNopeDim,
                                             q_rope.ptr<uint16_t>() + r * kRopeDim);
  }
}

}  // namespace snapmla::cpu

// Cache writes, gathers and query quantization on the CPU backend: the
// semantics of docs/kv-format.md, which the CUDA kernels must match bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/numeric.h"
#include "cpu/host_cache.h"
#include "snapmla/snapmla.h"

namespace snapmla {
namespace {

using testing::HostCache;
using testing::to_bf16;

const Device kCpu = Device::cpu();

std::vector<float> random_bf16_values(size_t n, double stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = round_to_bf16(static_cast<float>(normal(rng)));
  return v;
}

TensorView rows_f32(std::vector<float>& v, int64_t width) {
  return TensorView::contiguous(v.data(), DType::kFloat32, kCpu, {static_cast<int64_t>(v.size()) / width, width});
}
TensorView rows_bf16(std::vector<uint16_t>& v, int64_t width) {
  return TensorView::contiguous(v.data(), DType::kBFloat16, kCpu, {static_cast<int64_t>(v.size()) / width, width});
}
TensorView index_view(std::vector<int32_t>& v) {
  return TensorView::contiguous(v.data(), DType::kInt32, kCpu, {static_cast<int64_t>(v.size())});
}

// Slot s is at page s / 64, row s % 64: byte offsets in each planar tensor.
TEST(KvCacheLayout, SlotOffsetsInEachTensor) {
  for (KvFormat format : {KvFormat::kFP8, KvFormat::kBF16}) {
    HostCache cache(format, 4);
    std::vector<float> c_kv = random_bf16_values(kNopeDim, 0.3, 1), k_pe = random_bf16_values(kRopeDim, 0.3, 2);
    const int32_t slot = 2 * 64 + 37;
    std::vector<int32_t> slots{slot};
    write_kv_cache(rows_f32(c_kv, kNopeDim), rows_f32(k_pe, kRopeDim), index_view(slots), cache.view());
    if (format == KvFormat::kBF16) {
      for (size_t i = 0; i < cache.data.size(); ++i) {
        const bool inside = i >= size_t{slot} * 576 && i < size_t{slot + 1} * 576;
        ASSERT_EQ(cache.data[i] != 0x7fc0, inside) << "element " << i;
      }
      EXPECT_EQ(cache.data[slot * 576 + 3], float_to_bf16_bits(c_kv[3]));
      EXPECT_EQ(cache.data[slot * 576 + 512 + 5], float_to_bf16_bits(k_pe[5]));
    } else {
      const uint8_t* nope_bytes = cache.nope.data();
      for (size_t i = 0; i < cache.nope.size(); ++i)
        ASSERT_EQ(nope_bytes[i] != 0x7f, i >= size_t{slot} * 512 && i < size_t{slot + 1} * 512) << i;
      for (size_t i = 0; i < cache.scale.size(); ++i) ASSERT_EQ(!std::isnan(cache.scale[i]), i == size_t{slot});
      for (size_t i = 0; i < cache.rope.size(); ++i)
        ASSERT_EQ(cache.rope[i] != 0x7fc0, i >= size_t{slot} * 64 && i < size_t{slot + 1} * 64) << i;
      // Byte offsets: page p of nope starts at p * 32 KiB, of scale at p * 256 B, of rope at p * 8 KiB.
      EXPECT_EQ(reinterpret_cast<const uint8_t*>(&cache.scale[slot]) - reinterpret_cast<const uint8_t*>(cache.scale.data()),
                2 * 256 + 37 * 4);
      EXPECT_EQ(reinterpret_cast<const uint8_t*>(&cache.rope[slot * 64]) -
                    reinterpret_cast<const uint8_t*>(cache.rope.data()),
                2 * 8192 + 37 * 128);
    }
  }
}

TEST(KvCacheWrite, Fp8TokenSemantics) {
  const int n = 200;
  std::vector<float> c_kv = random_bf16_values(size_t{n} * kNopeDim, 0.5, 3);
  std::vector<float> k_pe = random_bf16_values(size_t{n} * kRopeDim, 20.0, 4);
  // Edge tokens: all zero, one huge, one tiny.
  for (int i = 0; i < kNopeDim; ++i) c_kv[i] = 0.0f;
  for (int j = 0; j < kRopeDim; ++j) k_pe[j] = 0.0f;
  c_kv[kNopeDim + 7] = 3.0e4f;
  for (int i = 0; i < kNopeDim; ++i) c_kv[2 * kNopeDim + i] *= 1e-4f;
  std::vector<int32_t> slots(n);
  for (int t = 0; t < n; ++t) slots[t] = (t * 37) % (4 * 64);
  HostCache cache(KvFormat::kFP8, 4);
  write_kv_cache(rows_f32(c_kv, kNopeDim), rows_f32(k_pe, kRopeDim), index_view(slots), cache.view());
  for (int t = 0; t < n; ++t) {
    const float* x = &c_kv[t * kNopeDim];
    float amax = 0;
    for (int i = 0; i < kNopeDim; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    const float scale = amax > 0 ? amax / 448.0f : 1.0f;
    const int s = slots[t];
    ASSERT_EQ(cache.scale[s], scale) << "token " << t;
    for (int i = 0; i < kNopeDim; ++i) {
      ASSERT_EQ(cache.nope[s * kNopeDim + i], float_to_e4m3_bits(x[i] / scale)) << "token " << t << " dim " << i;
      // Round trip error: half an e4m3 step (2^-4 relative) or the subnormal quantum.
      const double back = e4m3_bits_to_float(cache.nope[s * kNopeDim + i]) * double(scale);
      ASSERT_LE(std::fabs(back - x[i]), std::max(std::fabs(x[i]) * 0.0625, std::ldexp(double(scale), -10)) * 1.000001);
    }
    for (int j = 0; j < kRopeDim; ++j) {
      const float kp = k_pe[t * kRopeDim + j];
      ASSERT_EQ(cache.rope[s * kRopeDim + j], float_to_bf16_bits(kp / scale));
      const double back = bf16_bits_to_float(cache.rope[s * kRopeDim + j]) * double(scale);
      ASSERT_LE(std::fabs(back - kp), std::fabs(kp) * std::ldexp(1.0, -8) * 1.000001);
    }
  }
  // The largest element maps to 448 exactly; the zero token stores zeros with scale 1.
  EXPECT_EQ(cache.nope[slots[1] * kNopeDim + 7], 0x7e);
  EXPECT_EQ(cache.scale[slots[0]], 1.0f);
  EXPECT_EQ(cache.nope[slots[0] * kNopeDim + 100], 0x00);
}

TEST(KvCacheWrite, RopeIsExactWhenScaleIsAPowerOfTwo) {
  std::vector<float> c_kv = random_bf16_values(kNopeDim, 1.0, 5), k_pe = random_bf16_values(kRopeDim, 100.0, 6);
  for (float& x : c_kv) x = std::fmin(std::fmax(x, -6.0f), 6.0f);
  c_kv[11] = -7.0f;  // amax 7 -> scale 7/448 = 2^-6
  std::vector<int32_t> slots{5};
  HostCache cache(KvFormat::kFP8, 1);
  write_kv_cache(rows_f32(c_kv, kNopeDim), rows_f32(k_pe, kRopeDim), index_view(slots), cache.view());
  ASSERT_EQ(cache.scale[5], 1.0f / 64.0f);
  for (int j = 0; j < kRopeDim; ++j) EXPECT_EQ(bf16_bits_to_float(cache.rope[5 * 64 + j]) * cache.scale[5], k_pe[j]);
}

TEST(KvCacheWrite, SkipsSlotMinusOneAndAcceptsBf16AndStridedRows) {
  // c_kv and k_pe as the two slices of one [n, 576] bf16 projection output.
  const int n = 6;
  std::vector<float> fused = random_bf16_values(size_t{n} * kHeadDim, 0.2, 7);
  std::vector<uint16_t> fused_bf16 = to_bf16(fused);
  TensorView c_kv = TensorView::contiguous(fused_bf16.data(), DType::kBFloat16, kCpu, {n, kNopeDim});
  c_kv.stride[0] = kHeadDim;
  TensorView k_pe = TensorView::contiguous(fused_bf16.data() + kNopeDim, DType::kBFloat16, kCpu, {n, kRopeDim});
  k_pe.stride[0] = kHeadDim;
  std::vector<int64_t> slots{3, -1, 70, -1, 0, 127};
  for (KvFormat format : {KvFormat::kBF16, KvFormat::kFP8}) {
    HostCache cache(format, 2);
    write_kv_cache(c_kv, k_pe, TensorView::contiguous(slots.data(), DType::kInt64, kCpu, {n}), cache.view());
    std::vector<int32_t> written;
    for (int t = 0; t < n; ++t)
      if (slots[t] >= 0) written.push_back(static_cast<int32_t>(slots[t]));
    std::vector<uint16_t> nope_out(written.size() * kNopeDim, 0xffff), rope_out(written.size() * kRopeDim, 0xffff);
    gather_kv_cache(cache.view(), index_view(written), rows_bf16(nope_out, kNopeDim), rows_bf16(rope_out, kRopeDim));
    for (size_t k = 0, t = 0; t < size_t{n}; ++t) {
      if (slots[t] < 0) continue;
      for (int i = 0; i < kNopeDim; ++i) {
        const float x = fused[t * kHeadDim + i];
        const float got = bf16_bits_to_float(nope_out[k * kNopeDim + i]);
        if (format == KvFormat::kBF16) {
          ASSERT_EQ(got, x);  // bf16 inputs are stored as they are
        } else {
          // e4m3 step (2^-4 relative) plus the output's bf16 rounding (2^-8).
          ASSERT_NEAR(got, x, std::fabs(x) * 0.07 + 1e-5);
        }
      }
      for (int j = 0; j < kRopeDim; ++j)
        ASSERT_NEAR(bf16_bits_to_float(rope_out[k * kRopeDim + j]), fused[t * kHeadDim + kNopeDim + j],
                    std::fabs(fused[t * kHeadDim + kNopeDim + j]) * (format == KvFormat::kBF16 ? 0.0 : 0.008));
      ++k;
    }
    // Skipped tokens touched nothing: exactly the 4 slots were written.
    int written_slots = 0;
    for (int s = 0; s < 128; ++s)
      written_slots += format == KvFormat::kBF16 ? cache.data[s * kHeadDim] != 0x7fc0 : !std::isnan(cache.scale[s]);
    EXPECT_EQ(written_slots, 4);
  }
}

TEST(KvCacheGather, Fp8IsBf16OfValueTimesScale) {
  const int n = 64;
  std::vector<float> c_kv = random_bf16_values(size_t{n} * kNopeDim, 1.0, 8), k_pe = random_bf16_values(size_t{n} * kRopeDim, 5.0, 9);
  std::vector<int32_t> slots(n);
  for (int t = 0; t < n; ++t) slots[t] = 64 + (t * 5) % 64;
  HostCache cache(KvFormat::kFP8, 2);
  write_kv_cache(rows_f32(c_kv, kNopeDim), rows_f32(k_pe, kRopeDim), index_view(slots), cache.view());
  std::vector<uint16_t> nope_out(size_t{n} * kNopeDim), rope_out(size_t{n} * kRopeDim);
  gather_kv_cache(cache.view(), index_view(slots), rows_bf16(nope_out, kNopeDim), rows_bf16(rope_out, kRopeDim));
  for (int t = 0; t < n; ++t) {
    const int s = slots[t];
    const float scale = cache.scale[s];
    for (int i = 0; i < kNopeDim; ++i)
      ASSERT_EQ(nope_out[t * kNopeDim + i], float_to_bf16_bits(e4m3_bits_to_float(cache.nope[s * kNopeDim + i]) * scale));
    for (int j = 0; j < kRopeDim; ++j)
      ASSERT_EQ(rope_out[t * kRopeDim + j], float_to_bf16_bits(bf16_bits_to_float(cache.rope[s * kRopeDim + j]) * scale));
  }
}

// cos_sin for positions 0..max_pos-1 with the usual RoPE frequencies.
std::vector<float> rope_table(int max_pos) {
  std::vector<float> table(size_t(max_pos) * kRopeDim);
  for (int p = 0; p < max_pos; ++p)
    for (int i = 0; i < 32; ++i) {
      const double angle = p * std::pow(10000.0, -2.0 * i / 64.0);
      table[p * 64 + i] = static_cast<float>(std::cos(angle));
      table[p * 64 + 32 + i] = static_cast<float>(std::sin(angle));
    }
  return table;
}

TEST(KvCacheWrite, RopeInterleavedAndNeoxMatchTheRotationFormula) {
  const int n = 40, max_pos = 5000;
  std::vector<float> c_kv = random_bf16_values(size_t{n} * kNopeDim, 0.1, 10), k_pe = random_bf16_values(size_t{n} * kRopeDim, 1.0, 11);
  std::vector<float> table = rope_table(max_pos);
  std::vector<int32_t> positions(n), slots(n);
  for (int t = 0; t < n; ++t) {
    positions[t] = (t * 997) % max_pos;
    slots[t] = t;
  }
  std::vector<uint16_t> stored[2];
  int style_index = 0;
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kNeox}) {
    HostCache cache(KvFormat::kBF16, 1);
    KvWriteOptions options;
    options.rope = style;
    options.positions = index_view(positions);
    options.cos_sin = TensorView::contiguous(table.data(), DType::kFloat32, kCpu, {max_pos, 64});
    write_kv_cache(rows_f32(c_kv, kNopeDim), rows_f32(k_pe, kRopeDim), index_view(slots), cache.view(), options);
    for (int t = 0; t < n; ++t) {
      for (int i = 0; i < 32; ++i) {
        // (x + iy) * e^(i angle), in double.
        const int a = style == RopeStyle::kInterleaved ? 2 * i : i;
        const int b = style == RopeStyle::kInterleaved ? 2 * i + 1 : i + 32;
        const double angle = positions[t] * std::pow(10000.0, -2.0 * i / 64.0);
        const double x = k_pe[t * 64 + a], y = k_pe[t * 64 + b];
        const double rx = x * std::cos(angle) - y * std::sin(angle), ry = y * std::cos(angle) + x * std::sin(angle);
        const double tol_x = std::fabs(rx) * std::ldexp(1.0, -8) + 1e-5, tol_y = std::fabs(ry) * std::ldexp(1.0, -8) + 1e-5;
        ASSERT_NEAR(bf16_bits_to_float(cache.data[t * kHeadDim + kNopeDim + a]), rx, tol_x) << "token " << t << " pair " << i;
        ASSERT_NEAR(bf16_bits_to_float(cache.data[t * kHeadDim + kNopeDim + b]), ry, tol_y) << "token " << t << " pair " << i;
      }
      for (int i = 0; i < kNopeDim; ++i) ASSERT_EQ(cache.data[t * kHeadDim + i], float_to_bf16_bits(c_kv[t * kNopeDim + i]));
    }
    stored[style_index++] = cache.data;
  }
  EXPECT_NE(stored[0], stored[1]);

  // fp8: the rotated k_pe is divided by the content scale.
  HostCache cache(KvFormat::kFP8, 1);
  KvWriteOptions options;
  options.rope = RopeStyle::kNeox;
  options.positions = index_view(positions);
  options.cos_sin = TensorView::contiguous(table.data(), DType::kFloat32, kCpu, {max_pos, 64});
  write_kv_cache(rows_f32(c_kv, kNopeDim), rows_f32(k_pe, kRopeDim), index_view(slots), cache.view(), options);
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < kRopeDim; ++j) {
      const float rotated = bf16_bits_to_float(stored[1][t * kHeadDim + kNopeDim + j]);
      ASSERT_NEAR(bf16_bits_to_float(cache.rope[t * 64 + j]) * cache.scale[t], rotated, std::fabs(rotated) * 0.01 + 1e-5);
    }
}

TEST(QuantizeQuery, SameQuantizerAsTheCache) {
  const int b = 2, s_q = 2, h_q = 3, rows = b * s_q * h_q;
  std::vector<float> q = random_bf16_values(size_t{rows} * kHeadDim, 0.3, 12);
  for (int j = 0; j < kRopeDim; ++j) q[5 * kHeadDim + kNopeDim + j] = round_to_bf16(q[5 * kHeadDim + kNopeDim + j] * 50.0f);  // a large-rope row
  std::vector<uint16_t> q_bf16 = to_bf16(q);
  std::vector<uint8_t> q_nope(size_t{rows} * kNopeDim, 0x7f);
  std::vector<float> q_scale(rows, -1.0f);
  std::vector<uint16_t> q_rope(size_t{rows} * kRopeDim, 0x7fc0);
  quantize_query(TensorView::contiguous(q_bf16.data(), DType::kBFloat16, kCpu, {b, s_q, h_q, kHeadDim}),
                 TensorView::contiguous(q_nope.data(), DType::kFloat8E4M3, kCpu, {b, s_q, h_q, kNopeDim}),
                 TensorView::contiguous(q_scale.data(), DType::kFloat32, kCpu, {b, s_q, h_q}),
                 TensorView::contiguous(q_rope.data(), DType::kBFloat16, kCpu, {b, s_q, h_q, kRopeDim}));
  // Writing the same rows as cache tokens must give the same bytes.
  std::vector<float> c_kv(size_t{rows} * kNopeDim), k_pe(size_t{rows} * kRopeDim);
  std::vector<int32_t> slots(rows);
  for (int r = 0; r < rows; ++r) {
    std::copy_n(&q[r * kHeadDim], kNopeDim, &c_kv[r * kNopeDim]);
    std::copy_n(&q[r * kHeadDim + kNopeDim], kRopeDim, &k_pe[r * kRopeDim]);
    slots[r] = r;
  }
  HostCache cache(KvFormat::kFP8, 1);
  write_kv_cache(rows_f32(c_kv, kNopeDim), rows_f32(k_pe, kRopeDim), index_view(slots), cache.view());
  EXPECT_EQ(std::vector<uint8_t>(cache.nope.begin(), cache.nope.begin() + rows * kNopeDim), q_nope);
  EXPECT_EQ(std::vector<float>(cache.scale.begin(), cache.scale.begin() + rows), q_scale);
  EXPECT_EQ(std::vector<uint16_t>(cache.rope.begin(), cache.rope.begin() + rows * kRopeDim), q_rope);
  for (int r = 0; r < rows; ++r) EXPECT_GT(q_scale[r], 0.0f);
}

}  // namespace
}  // namespace snapmla

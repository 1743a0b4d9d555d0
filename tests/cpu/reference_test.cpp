// The float64 oracle against a naive implementation written here, the fp8
// emulation against direct formulas, and the CPU mla_decode entry point.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "core/numeric.h"
#include "core/synthetic.h"
#include "cpu/host_cache.h"
#include "cpu/reference.h"
#include "snapmla/snapmla.h"

namespace snapmla {
namespace {

using testing::HostCache;
using testing::to_bf16;

const Device kCpu = Device::cpu();
const double kScale = 1.0 / std::sqrt(576.0);

struct Case {
  synthetic::Workload w;
  std::vector<uint16_t> q_bf16;
  std::vector<int32_t> seqlens;
  HostCache cache;

  Case(KvFormat format, synthetic::WorkloadSpec spec)
      : w(synthetic::make_workload(spec)), q_bf16(to_bf16(w.q)), seqlens(spec.seqlens),
        cache(testing::cache_from_workload(w, format)) {}

  TensorView q() { return TensorView::contiguous(q_bf16.data(), DType::kBFloat16, kCpu, {w.spec.batch, w.spec.s_q, w.spec.h_q, kHeadDim}); }
  TensorView block_table() { return TensorView::contiguous(w.block_table.data(), DType::kInt32, kCpu, {w.spec.batch, w.max_pages}); }
  TensorView cache_seqlens() { return TensorView::contiguous(seqlens.data(), DType::kInt32, kCpu, {w.spec.batch}); }
};

synthetic::WorkloadSpec spec_of(std::vector<int32_t> seqlens, int h_q, int s_q, uint64_t seed,
                                synthetic::Distribution d = synthetic::Distribution::kGaussian) {
  synthetic::WorkloadSpec spec;
  spec.batch = static_cast<int>(seqlens.size());
  spec.h_q = h_q;
  spec.s_q = s_q;
  spec.seqlens = std::move(seqlens);
  spec.seed = seed;
  spec.distribution = d;
  spec.extra_pages = 2;
  return spec;
}

// The keys of sequence b as the cache stores them, dequantized in double,
// read straight from the planar tensors (independent of the reference).
std::vector<double> stored_keys(Case& c, int b) {
  const int64_t s_k = c.seqlens[b];
  std::vector<double> keys(s_k * kHeadDim);
  for (int64_t t = 0; t < s_k; ++t) {
    const int64_t slot = int64_t{c.w.block_table[b * c.w.max_pages + t / 64]} * 64 + t % 64;
    for (int d = 0; d < kHeadDim; ++d) {
      double v;
      if (c.cache.format == KvFormat::kBF16) {
        v = bf16_bits_to_float(c.cache.data[slot * 576 + d]);
      } else {
        v = d < 512 ? e4m3_bits_to_float(c.cache.nope[slot * 512 + d]) : bf16_bits_to_float(c.cache.rope[slot * 64 + d - 512]);
        v *= c.cache.scale[slot];
      }
      keys[t * kHeadDim + d] = v;
    }
  }
  return keys;
}

// Textbook attention, one row at a time: scores, max, exp, normalise.
reference::DecodeResult naive_decode(Case& c, bool causal) {
  const int batch = c.w.spec.batch, s_q = c.w.spec.s_q, h_q = c.w.spec.h_q;
  reference::DecodeResult r;
  r.out.assign(size_t(batch) * s_q * h_q * 512, 0.0);
  r.lse.assign(size_t(batch) * s_q * h_q, -std::numeric_limits<double>::infinity());
  for (int b = 0; b < batch; ++b) {
    const std::vector<double> keys = stored_keys(c, b);
    const int64_t s_k = c.seqlens[b];
    for (int i = 0; i < s_q; ++i)
      for (int h = 0; h < h_q; ++h) {
        const size_t row = (size_t(b) * s_q + i) * h_q + h;
        std::vector<double> scores;
        for (int64_t t = 0; t < s_k; ++t) {
          if (causal && t > s_k - s_q + i) break;  // query i is token s_k - s_q + i
          double dot = 0;
          for (int d = 0; d < 576; ++d) dot += double(c.w.q[row * 576 + d]) * keys[t * 576 + d];
          scores.push_back(dot * kScale);
        }
        if (scores.empty()) continue;
        double m = scores[0];
        for (double s : scores) m = std::max(m, s);
        double sum = 0;
        for (size_t t = 0; t < scores.size(); ++t) {
          const double p = std::exp(scores[t] - m);
          sum += p;
          for (int d = 0; d < 512; ++d) r.out[row * 512 + d] += p * keys[t * 576 + d];
        }
        for (int d = 0; d < 512; ++d) r.out[row * 512 + d] /= sum;
        r.lse[(size_t(b) * h_q + h) * s_q + i] = m + std::log(sum);
      }
  }
  return r;
}

void expect_same(const reference::DecodeResult& got, const reference::DecodeResult& want, double tol) {
  ASSERT_EQ(got.out.size(), want.out.size());
  ASSERT_EQ(got.lse.size(), want.lse.size());
  const reference::ErrorStats out = reference::compare(got.out, want.out);
  EXPECT_LE(out.rel_l2, tol);
  EXPECT_EQ(out.nonfinite, 0);
  const reference::ErrorStats lse = reference::compare_lse(got.lse, want.lse);
  EXPECT_EQ(lse.nonfinite, 0) << "rows that see no token must have lse -inf in both";
  // lse is absolute, of magnitude log(s_k) + the largest score (units to tens
  // here), and summed in another order than the naive oracle's, so its error is
  // about |lse| times the relative rounding `tol` bounds: 10 * tol covers |lse|
  // up to 10 at the output's relative accuracy.
  EXPECT_LE(lse.max_abs, tol * 10);
  for (size_t i = 0; i < want.lse.size(); ++i)
    if (std::isinf(want.lse[i])) EXPECT_LT(got.lse[i], 0);
}

// Both implementations are float64 with different summation orders, so they
// agree to ~1e-15 relative; 1e-12 leaves room for long sums and still catches
// any real mistake (a wrong key, scale or mask moves results by >= 1e-4).
constexpr double kF64Tolerance = 1e-12;

TEST(ReferenceDecode, MatchesNaiveF64AcrossShapes) {
  uint64_t seed = 100;
  for (KvFormat format : {KvFormat::kBF16, KvFormat::kFP8})
    for (int h_q : {1, 16, 64, 128})
      for (int s_q = 1; s_q <= 4; ++s_q) {
        if (h_q == 128 && s_q > 2 && format == KvFormat::kBF16) continue;  // runtime budget
        SCOPED_TRACE(std::string(kv_format_name(format)) + " h_q " + std::to_string(h_q) + " s_q " + std::to_string(s_q));
        Case c(format, spec_of({0, 2, 65, 150}, h_q, s_q, seed++));
        const reference::DecodeResult ref =
            reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true);
        expect_same(ref, naive_decode(c, true), kF64Tolerance);
      }
}

TEST(ReferenceDecode, NonCausalAndEmptyRows) {
  Case c(KvFormat::kFP8, spec_of({3, 0, 64, 129}, 8, 4, 7));
  const reference::DecodeResult ref =
      reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, false);
  expect_same(ref, naive_decode(c, false), kF64Tolerance);
  // Sequence 1 is empty: zero output and lse -inf in every row.
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 8; ++h) {
      EXPECT_TRUE(std::isinf(ref.lse[(1 * 8 + h) * 4 + i]) && ref.lse[(1 * 8 + h) * 4 + i] < 0);
      for (int d = 0; d < 512; ++d) ASSERT_EQ(ref.out[((size_t(1) * 4 + i) * 8 + h) * 512 + d], 0.0);
    }
  // Causal with 3 keys and 4 queries: query 0 sees nothing, query 1 one key.
  const reference::DecodeResult causal =
      reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true);
  EXPECT_TRUE(std::isinf(causal.lse[0 * 4 + 0]));
  EXPECT_EQ(reference::visible_keys(3, 4, 1, true), 1);
  EXPECT_EQ(reference::visible_keys(3, 4, 0, true), 0);
  EXPECT_EQ(reference::visible_keys(3, 4, 0, false), 3);
  // With one visible key the lse is that key's score and out is its value.
  const std::vector<double> keys = stored_keys(c, 0);
  for (int h = 0; h < 8; ++h) {
    const size_t row = size_t{1} * 8 + h;  // b 0, i 1
    double dot = 0;
    for (int d = 0; d < 576; ++d) dot += double(c.w.q[row * 576 + d]) * keys[d];
    EXPECT_NEAR(causal.lse[h * 4 + 1], dot * kScale, 1e-12);
    for (int d = 0; d < 512; ++d) ASSERT_NEAR(causal.out[row * 512 + d], keys[d], 1e-12);
  }
}

TEST(ReferenceDecode, DenseAgreesWithPagedOnBf16Cache) {
  Case c(KvFormat::kBF16, spec_of({1, 100, 0, 64}, 16, 2, 11, synthetic::Distribution::kHeavyTailNorms));
  std::vector<std::vector<double>> keys;
  for (int b = 0; b < 4; ++b) keys.push_back(synthetic::sequence_keys(c.w, b));
  const std::vector<double> q(c.w.q.begin(), c.w.q.end());
  expect_same(reference::decode_dense(q, 4, 2, 16, keys, kScale, true),
              reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true),
              kF64Tolerance);
}

TEST(ReferenceDecode, QueryQuantizationEmulationUsesQuantizeQuery) {
  Case c(KvFormat::kFP8, spec_of({70, 200}, 16, 2, 13, synthetic::Distribution::kLargeQueryRope));
  const int rows = 2 * 2 * 16;
  std::vector<uint8_t> q_nope(size_t{rows} * 512);
  std::vector<float> q_scale(rows);
  std::vector<uint16_t> q_rope(size_t{rows} * 64);
  quantize_query(c.q(), TensorView::contiguous(q_nope.data(), DType::kFloat8E4M3, kCpu, {2, 2, 16, 512}),
                 TensorView::contiguous(q_scale.data(), DType::kFloat32, kCpu, {2, 2, 16}),
                 TensorView::contiguous(q_rope.data(), DType::kBFloat16, kCpu, {2, 2, 16, 64}));
  std::vector<double> dequantized(size_t{rows} * 576);
  for (int r = 0; r < rows; ++r)
    for (int d = 0; d < 576; ++d)
      dequantized[r * 576 + d] =
          (d < 512 ? e4m3_bits_to_float(q_nope[r * 512 + d]) : bf16_bits_to_float(q_rope[r * 64 + d - 512])) * double(q_scale[r]);
  const TensorView q64 = TensorView::contiguous(dequantized.data(), DType::kFloat64, kCpu, {2, 2, 16, 576});
  reference::Fp8Emulation emulation;
  emulation.quantize_query = true;
  const reference::DecodeResult emulated =
      reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true, emulation);
  expect_same(emulated, reference::decode_paged(q64, c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true),
              kF64Tolerance);
  // And the quantization really changed something.
  const reference::DecodeResult plain =
      reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true);
  EXPECT_GT(reference::compare(emulated.out, plain.out).rel_l2, 1e-5);
}

TEST(ReferenceDecode, PQuantizationOnOnePageMatchesTheFormula) {
  Case c(KvFormat::kFP8, spec_of({50}, 4, 1, 17, synthetic::Distribution::kHeavyTailNorms));
  reference::Fp8Emulation emulation;
  emulation.quantize_p = true;
  const reference::DecodeResult got =
      reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true, emulation);
  std::vector<int64_t> slots(50);
  for (int t = 0; t < 50; ++t) slots[t] = int64_t{c.w.block_table[0]} * 64 + t;
  for (int h = 0; h < 4; ++h) {
    // f_t = exp2(x_t - m) * s_v[t]; P^ = e4m3(f / (max f / 448)); out = sum P^ v8 / sum(e / s_p).
    std::vector<double> x(50), e(50), f(50);
    double m = -1e300, f_max = 0, e_sum = 0;
    for (int t = 0; t < 50; ++t) {
      double dot = 0;
      for (int d = 0; d < 576; ++d) {
        const double k = d < 512 ? e4m3_bits_to_float(c.cache.nope[slots[t] * 512 + d])
                                 : bf16_bits_to_float(c.cache.rope[slots[t] * 64 + d - 512]);
        dot += double(c.w.q[h * 576 + d]) * k;
      }
      x[t] = dot * c.cache.scale[slots[t]] * kScale * 1.4426950408889634;
      m = std::max(m, x[t]);
    }
    for (int t = 0; t < 50; ++t) {
      e[t] = std::exp2(x[t] - m);
      e_sum += e[t];
      f[t] = e[t] * c.cache.scale[slots[t]];
      f_max = std::max(f_max, f[t]);
    }
    const double s_p = f_max / 448;
    std::vector<double> out(512, 0.0);
    for (int t = 0; t < 50; ++t) {
      const double p = round_to_e4m3(static_cast<float>(f[t] / s_p));
      for (int d = 0; d < 512; ++d) out[d] += p * e4m3_bits_to_float(c.cache.nope[slots[t] * 512 + d]);
    }
    const double l = e_sum / s_p;
    for (int d = 0; d < 512; ++d) ASSERT_NEAR(got.out[h * 512 + d], out[d] / l, 1e-12 * (1 + std::fabs(out[d] / l)));
    EXPECT_NEAR(got.lse[h], (m + std::log2(l * s_p)) * std::log(2.0), 1e-12);
  }
}

TEST(ReferenceDecode, PQuantizationKeepsLseAndBoundsTheOutputError) {
  for (auto d : {synthetic::Distribution::kGaussian, synthetic::Distribution::kHeavyTailNorms, synthetic::Distribution::kAttentionSinks}) {
    SCOPED_TRACE(synthetic::distribution_name(d));
    Case c(KvFormat::kFP8, spec_of({700, 1, 130}, 16, 2, 19, d));
    reference::Fp8Emulation emulation;
    emulation.quantize_p = true;
    const reference::DecodeResult plain =
        reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true);
    const reference::DecodeResult emulated =
        reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true, emulation);
    // l accumulates the unquantized exponentials, so the lse is the same up to rounding.
    const reference::ErrorStats lse = reference::compare_lse(emulated.lse, plain.lse);
    EXPECT_EQ(lse.nonfinite, 0);
    EXPECT_LE(lse.max_abs, 1e-10);
    // P in e4m3 has a 2^-4 relative step; averaged over many tokens the output
    // error is a few percent at most, yet clearly non-zero.
    const reference::ErrorStats out = reference::compare(emulated.out, plain.out);
    EXPECT_LE(out.rel_l2, 3e-2);
    // (With sinks nearly all weight sits on 4 tokens whose P rounds almost exactly.)
    EXPECT_GT(out.rel_l2, d == synthetic::Distribution::kAttentionSinks ? 1e-7 : 1e-4);
    EXPECT_GT(out.cosine, 0.999);
  }
}

TEST(ReferenceDecode, RejectsIndicesOutsideTheCache) {
  Case c(KvFormat::kFP8, spec_of({70, 10}, 2, 1, 31));
  c.w.block_table[1 * c.w.max_pages] = static_cast<int32_t>(c.w.num_pages);
  try {
    reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "block_table") << e.what();
  }
  c.w.block_table[1 * c.w.max_pages] = 0;
  c.seqlens[0] = c.w.max_pages * 64 + 1;
  EXPECT_THROW(reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true), Error);
}

TEST(ReferenceCompare, Statistics) {
  const reference::ErrorStats same = reference::compare({1, 2, 3}, {1, 2, 3});
  EXPECT_EQ(same.rel_l2, 0);
  EXPECT_DOUBLE_EQ(same.cosine, 1);
  const reference::ErrorStats off = reference::compare({1, 2, 4}, {1, 2, 3});
  EXPECT_DOUBLE_EQ(off.rel_l2, 1 / std::sqrt(14.0));
  EXPECT_EQ(off.max_abs, 1);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(reference::compare({nan, 1}, {1, 1}).nonfinite, 1);
  EXPECT_TRUE(std::isnan(reference::compare({nan, 1}, {1, 1}).max_abs));
  const reference::ErrorStats lse = reference::compare_lse({1.5, -inf, 2}, {1, -inf, -inf});
  EXPECT_EQ(lse.nonfinite, 1);
  EXPECT_EQ(lse.max_abs, 0.5);
}

// The public entry point on the CPU: the reference rounded to bf16 / f32.
TEST(CpuMlaDecode, IsTheReferenceRoundedToOutputTypes) {
  for (KvFormat format : {KvFormat::kBF16, KvFormat::kFP8}) {
    SCOPED_TRACE(kv_format_name(format));
    Case c(format, spec_of({90, 0, 3, 64}, 32, 3, 23));
    const int batch = 4, s_q = 3, h_q = 32;
    std::vector<uint16_t> out(size_t{batch} * s_q * h_q * 512, 0x7fc0);
    std::vector<float> lse(size_t{batch} * h_q * s_q, std::numeric_limits<float>::quiet_NaN());
    DecodeParams params;
    params.q = c.q();
    params.cache = c.cache.view();
    params.block_table = c.block_table();
    params.cache_seqlens = c.cache_seqlens();
    params.out = TensorView::contiguous(out.data(), DType::kBFloat16, kCpu, {batch, s_q, h_q, 512});
    params.lse = TensorView::contiguous(lse.data(), DType::kFloat32, kCpu, {batch, h_q, s_q});
    mla_decode(params);  // softmax_scale 0: 1/sqrt(576)
    const reference::DecodeResult ref =
        reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true);
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_EQ(out[i], float_to_bf16_bits(static_cast<float>(ref.out[i]))) << i;
    for (size_t i = 0; i < lse.size(); ++i) ASSERT_EQ(lse[i], static_cast<float>(ref.lse[i])) << i;

    if (format != KvFormat::kFP8) continue;
    // Pre-quantized query: the same as the reference with query quantization emulated.
    const int rows = batch * s_q * h_q;
    std::vector<uint8_t> q_nope(size_t{rows} * 512);
    std::vector<float> q_scale(rows);
    std::vector<uint16_t> q_rope(size_t{rows} * 64);
    params.q_nope = TensorView::contiguous(q_nope.data(), DType::kFloat8E4M3, kCpu, {batch, s_q, h_q, 512});
    params.q_scale = TensorView::contiguous(q_scale.data(), DType::kFloat32, kCpu, {batch, s_q, h_q});
    params.q_rope = TensorView::contiguous(q_rope.data(), DType::kBFloat16, kCpu, {batch, s_q, h_q, 64});
    quantize_query(c.q(), params.q_nope, params.q_scale, params.q_rope);
    params.q = TensorView{};
    params.softmax_scale = 0.1f;
    std::fill(out.begin(), out.end(), 0x7fc0);
    mla_decode(params);
    reference::Fp8Emulation emulation;
    emulation.quantize_query = true;
    const reference::DecodeResult qref = reference::decode_paged(c.q(), c.cache.view(), c.block_table(),
                                                                 c.cache_seqlens(), double(0.1f), true, emulation);
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_EQ(out[i], float_to_bf16_bits(static_cast<float>(qref.out[i]))) << i;
    for (size_t i = 0; i < lse.size(); ++i) ASSERT_EQ(lse[i], static_cast<float>(qref.lse[i])) << i;
  }
}

// fp8 cache + query against the unquantized data: the accuracy the format
// promises (FlagGems' gate for the SnapMLA kernel: rel-L2 <= 5e-2, |dLSE| <= 2e-2).
TEST(CpuMlaDecode, Fp8FormatIsCloseToUnquantizedAttention) {
  Case c(KvFormat::kFP8, spec_of({300, 64}, 16, 1, 29, synthetic::Distribution::kRopeOutliers));
  std::vector<std::vector<double>> keys;
  for (int b = 0; b < 2; ++b) keys.push_back(synthetic::sequence_keys(c.w, b));
  const reference::DecodeResult exact =
      reference::decode_dense(std::vector<double>(c.w.q.begin(), c.w.q.end()), 2, 1, 16, keys, kScale, true);
  reference::Fp8Emulation all;
  all.quantize_query = all.quantize_p = true;
  const reference::DecodeResult fp8 =
      reference::decode_paged(c.q(), c.cache.view(), c.block_table(), c.cache_seqlens(), kScale, true, all);
  const reference::ErrorStats out = reference::compare(fp8.out, exact.out);
  EXPECT_LE(out.rel_l2, 5e-2);
  EXPECT_GT(out.rel_l2, 1e-3);  // it is quantized
  EXPECT_LE(reference::compare_lse(fp8.lse, exact.lse).max_abs, 2e-2);
}

}  // namespace
}  // namespace snapmla

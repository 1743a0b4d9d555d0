// The workload generator: deterministic, bf16-exact, a valid random page
// layout, and each distribution has the statistic it claims.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "core/numeric.h"
#include "core/schedule.h"
#include "core/synthetic.h"
#include "snapmla/error.h"
#include "snapmla/kv_format.h"

namespace snapmla::synthetic {
namespace {

WorkloadSpec spec_of(Distribution d, std::vector<int32_t> seqlens, int h_q = 16, int s_q = 1, uint64_t seed = 5) {
  WorkloadSpec spec;
  spec.batch = static_cast<int>(seqlens.size());
  spec.s_q = s_q;
  spec.h_q = h_q;
  spec.seqlens = std::move(seqlens);
  spec.distribution = d;
  spec.seed = seed;
  return spec;
}

TEST(Synthetic, DeterministicPerSeed) {
  const Workload a = make_workload(spec_of(Distribution::kGaussian, {100, 3}));
  const Workload b = make_workload(spec_of(Distribution::kGaussian, {100, 3}));
  const Workload c = make_workload(spec_of(Distribution::kGaussian, {100, 3}, 16, 1, 6));
  EXPECT_EQ(a.q, b.q);
  EXPECT_EQ(a.c_kv, b.c_kv);
  EXPECT_EQ(a.block_table, b.block_table);
  EXPECT_NE(a.q, c.q);
  EXPECT_NE(a.c_kv, c.c_kv);
}

TEST(Synthetic, ValuesAreBf16AndPagesAreAValidPermutation) {
  for (Distribution d : all_distributions()) {
    SCOPED_TRACE(distribution_name(d));
    WorkloadSpec spec = spec_of(d, {0, 1, 64, 65, 300}, 8, 2);
    spec.extra_pages = 3;
    const Workload w = make_workload(spec);
    for (const auto* v : {&w.q, &w.c_kv, &w.k_pe})
      for (float x : *v) ASSERT_EQ(x, round_to_bf16(x));
    EXPECT_EQ(w.q.size(), size_t{5} * 2 * 8 * kHeadDim);
    EXPECT_EQ(w.token_offset.back(), 0 + 1 + 64 + 65 + 300);
    EXPECT_EQ(w.num_pages, 0 + 1 + 1 + 2 + 5 + 3);
    EXPECT_EQ(w.max_pages, 5);
    std::set<int32_t> used;
    for (int b = 0; b < spec.batch; ++b)
      for (int p = 0; p < pages_for_tokens(spec.seqlens[b]); ++p) {
        const int32_t page = w.block_table[b * w.max_pages + p];
        ASSERT_GE(page, 0);
        ASSERT_LT(page, w.num_pages);
        EXPECT_TRUE(used.insert(page).second) << "page " << page << " used twice";
      }
    for (int b = 0; b < spec.batch; ++b)
      for (int t = 0; t < spec.seqlens[b]; ++t)
        EXPECT_EQ(w.slot_mapping[w.token_offset[b] + t], w.block_table[b * w.max_pages + t / 64] * 64 + t % 64);
  }
  // Pages really are permuted (not 0, 1, 2, ... in order).
  const Workload w = make_workload(spec_of(Distribution::kGaussian, {64 * 20}));
  EXPECT_FALSE(std::is_sorted(w.block_table.begin(), w.block_table.end()));
  const Workload empty = make_workload(spec_of(Distribution::kGaussian, {0, 0}));
  EXPECT_EQ(empty.max_pages, 1);
  EXPECT_GE(empty.num_pages, 1);
}

double rms(const std::vector<float>& v, int width, int begin, int end) {
  double s = 0;
  int64_t n = 0;
  for (size_t r = 0; r < v.size() / width; ++r)
    for (int i = begin; i < end; ++i, ++n) s += double(v[r * width + i]) * v[r * width + i];
  return std::sqrt(s / double(n));
}

TEST(Synthetic, DistributionsHaveTheirStatistics) {
  const Workload g = make_workload(spec_of(Distribution::kGaussian, {500}));
  EXPECT_NEAR(rms(g.c_kv, kNopeDim, 0, kNopeDim), 0.1, 0.01);
  for (float x : g.c_kv) ASSERT_LE(std::fabs(x), 1.0f);

  const Workload outliers = make_workload(spec_of(Distribution::kRopeOutliers, {500}));
  EXPECT_GT(rms(outliers.k_pe, kRopeDim, 60, 64), 50 * rms(outliers.k_pe, kRopeDim, 0, 60));

  const Workload heavy = make_workload(spec_of(Distribution::kHeavyTailNorms, {1000}));
  float lo = 1e30f, hi = 0;
  for (int t = 0; t < 1000; ++t) {
    float amax = 0;
    for (int i = 0; i < kNopeDim; ++i) amax = std::max(amax, std::fabs(heavy.c_kv[t * kNopeDim + i]));
    lo = std::min(lo, amax);
    hi = std::max(hi, amax);
  }
  EXPECT_GT(hi / lo, 1000.0f) << "token amax should spread over orders of magnitude";

  const Workload large_rope = make_workload(spec_of(Distribution::kLargeQueryRope, {10}));
  EXPECT_NEAR(rms(large_rope.q, kHeadDim, kNopeDim, kHeadDim) / rms(large_rope.q, kHeadDim, 0, kNopeDim), 30.0, 4.0);
}

TEST(Synthetic, AttentionSinksTakeMostOfTheMass) {
  const Workload w = make_workload(spec_of(Distribution::kAttentionSinks, {1000, 300}, 16, 2));
  const double scale = 1.0 / std::sqrt(576.0);
  for (int b = 0; b < 2; ++b) {
    const std::vector<double> keys = sequence_keys(w, b);
    const int64_t s_k = static_cast<int64_t>(keys.size() / kHeadDim);
    for (int r = 0; r < 2 * 16; ++r) {
      const float* q = &w.q[(static_cast<size_t>(b) * 32 + r) * kHeadDim];
      std::vector<double> s(s_k);
      for (int64_t t = 0; t < s_k; ++t) {
        double dot = 0;
        for (int d = 0; d < kHeadDim; ++d) dot += q[d] * keys[t * kHeadDim + d];
        s[t] = dot * scale;
      }
      const double m = *std::max_element(s.begin(), s.end());
      double all = 0, sinks = 0;
      for (int64_t t = 0; t < s_k; ++t) {
        all += std::exp(s[t] - m);
        if (t < 4) sinks += std::exp(s[t] - m);
      }
      EXPECT_GT(sinks / all, 0.5) << "batch " << b << " row " << r;
    }
  }
}

TEST(Synthetic, NamesRoundTripAndBadSpecsThrow) {
  for (Distribution d : all_distributions()) {
    Distribution parsed = Distribution::kGaussian;
    ASSERT_TRUE(parse_distribution(distribution_name(d), &parsed));
    EXPECT_EQ(parsed, d);
  }
  Distribution unused;
  EXPECT_FALSE(parse_distribution("uniform", &unused));
  WorkloadSpec bad = spec_of(Distribution::kGaussian, {10});
  bad.batch = 2;
  EXPECT_THROW(make_workload(bad), Error);
  EXPECT_THROW(make_workload(spec_of(Distribution::kGaussian, {-1})), Error);
  EXPECT_THROW(make_workload(spec_of(Distribution::kGaussian, {1}, 129)), Error);
}

}  // namespace
}  // namespace snapmla::synthetic

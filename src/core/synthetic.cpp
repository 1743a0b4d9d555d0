// Synthetic decode workloads. Each distribution imitates one statistic of real
// MLA caches that stresses a different part of the fp8 path.
#include "core/synthetic.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/numeric.h"
#include "core/schedule.h"
#include "snapmla/decode.h"
#include "snapmla/error.h"
#include "snapmla/kv_format.h"

namespace snapmla::synthetic {
namespace {

// Box-Muller over mt19937_64 bits: unlike std::normal_distribution it gives
// the same numbers with every standard library, so seeds are reproducible.
class Normal {
 public:
  explicit Normal(uint64_t seed) : engine_(seed) {}
  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(engine_() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(engine_() >> 11) * 0x1.0p-53;        // [0, 1)
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 2.0 * 3.14159265358979323846 * u2;
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle);
  }
  uint64_t bits() { return engine_(); }

 private:
  std::mt19937_64 engine_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

// FlashMLA's test data: randn / 10, clamped so no value exceeds 1.
float small_gaussian(Normal& normal) { return static_cast<float>(std::clamp(normal() / 10.0, -1.0, 1.0)); }

void fill_gaussian(std::vector<float>& v, Normal& normal) {
  for (float& x : v) x = small_gaussian(normal);
}

// The 4 k_pe channels made outliers in kRopeOutliers: the last two rotation
// pairs (interleaved layout), which have the lowest RoPE frequencies. Those
// channels barely rotate, so trained models put large, persistent values
// there; SnapMLA measures RoPE values up to ~1e3 against content near 1e1.
constexpr int kOutlierChannels[] = {60, 61, 62, 63};
constexpr double kOutlierGain = 100.0;
constexpr double kLogNormalSigma = 1.5;
constexpr int kSinkTokens = 4;
constexpr double kSinkQueryShare = 2.0;   // norm of the direction every query shares
constexpr double kSinkKeyNorm = 100.0;    // sink key norm along that direction
constexpr double kQueryRopeGain = 30.0;

}  // namespace

const char* distribution_name(Distribution d) {
  switch (d) {
    case Distribution::kGaussian: return "gaussian";
    case Distribution::kRopeOutliers: return "rope-outliers";
    case Distribution::kHeavyTailNorms: return "heavy-tail-norms";
    case Distribution::kAttentionSinks: return "attention-sinks";
    case Distribution::kLargeQueryRope: return "large-query-rope";
  }
  return "unknown";
}

bool parse_distribution(const std::string& name, Distribution* d) {
  for (Distribution candidate : all_distributions())
    if (name == distribution_name(candidate)) {
      *d = candidate;
      return true;
    }
  return false;
}

std::vector<Distribution> all_distributions() {
  return {Distribution::kGaussian, Distribution::kRopeOutliers, Distribution::kHeavyTailNorms,
          Distribution::kAttentionSinks, Distribution::kLargeQueryRope};
}

Workload make_workload(const WorkloadSpec& spec) {
  if (spec.batch < 1) throw Error("spec.batch", "must be at least 1, got " + std::to_string(spec.batch));
  if (spec.s_q < 1 || spec.s_q > kMaxQueryLen) throw Error("spec.s_q", "must be in 1..4, got " + std::to_string(spec.s_q));
  if (spec.h_q < 1 || spec.h_q > 128) throw Error("spec.h_q", "must be in 1..128, got " + std::to_string(spec.h_q));
  if (static_cast<int>(spec.seqlens.size()) != spec.batch)
    throw Error("spec.seqlens", "has " + std::to_string(spec.seqlens.size()) + " entries for batch " +
                                    std::to_string(spec.batch));
  for (int32_t s : spec.seqlens)
    if (s < 0) throw Error("spec.seqlens", "has a negative length " + std::to_string(s));
  if (spec.extra_pages < 0) throw Error("spec.extra_pages", "must not be negative");

  Workload w;
  w.spec = spec;
  Normal normal(spec.seed);
  const int64_t rows = static_cast<int64_t>(spec.batch) * spec.s_q * spec.h_q;
  w.token_offset.assign(spec.batch + 1, 0);
  for (int b = 0; b < spec.batch; ++b) w.token_offset[b + 1] = w.token_offset[b] + spec.seqlens[b];
  const int64_t tokens = w.token_offset[spec.batch];

  w.q.resize(rows * kHeadDim);
  w.c_kv.resize(tokens * kNopeDim);
  w.k_pe.resize(tokens * kRopeDim);
  fill_gaussian(w.q, normal);
  fill_gaussian(w.c_kv, normal);
  fill_gaussian(w.k_pe, normal);

  switch (spec.distribution) {
    case Distribution::kGaussian: break;
    case Distribution::kRopeOutliers:
      for (int64_t t = 0; t < tokens; ++t)
        for (int c : kOutlierChannels) w.k_pe[t * kRopeDim + c] *= static_cast<float>(kOutlierGain);
      break;
    case Distribution::kHeavyTailNorms:
      // Token norms spread over orders of magnitude (log-normal): the case for
      // a per-token scale over a per-tensor one; within-page scale ratios also
      // stress the per-page P quantization.
      for (int64_t t = 0; t < tokens; ++t) {
        const float gain = static_cast<float>(std::exp(kLogNormalSigma * normal()));
        for (int i = 0; i < kNopeDim; ++i) w.c_kv[t * kNopeDim + i] *= gain;
        for (int j = 0; j < kRopeDim; ++j) w.k_pe[t * kRopeDim + j] *= gain;
      }
      break;
    case Distribution::kAttentionSinks: {
      // Attention sinks (StreamingLLM): real queries share a common direction
      // and the first tokens' keys align with it, so every head puts most of
      // its mass on them and the rest of the softmax lives in the tail.
      for (int b = 0; b < spec.batch; ++b) {
        std::vector<double> shared(kHeadDim);
        double norm = 0;
        for (double& x : shared) {
          x = normal();
          norm += x * x;
        }
        for (double& x : shared) x *= kSinkQueryShare / std::sqrt(norm);
        const int64_t first_row = static_cast<int64_t>(b) * spec.s_q * spec.h_q;
        std::vector<double> mean(kHeadDim, 0.0);
        for (int64_t r = first_row; r < first_row + spec.s_q * spec.h_q; ++r)
          for (int d = 0; d < kHeadDim; ++d) mean[d] += (w.q[r * kHeadDim + d] += static_cast<float>(shared[d]));
        double mean_norm = 0;
        for (double x : mean) mean_norm += x * x;
        mean_norm = std::sqrt(mean_norm);
        const int64_t sinks = std::min<int64_t>(kSinkTokens, spec.seqlens[b]);
        for (int64_t t = w.token_offset[b]; t < w.token_offset[b] + sinks; ++t) {
          for (int i = 0; i < kNopeDim; ++i) w.c_kv[t * kNopeDim + i] = static_cast<float>(kSinkKeyNorm * mean[i] / mean_norm);
          for (int j = 0; j < kRopeDim; ++j)
            w.k_pe[t * kRopeDim + j] = static_cast<float>(kSinkKeyNorm * mean[kNopeDim + j] / mean_norm);
        }
      }
      break;
    }
    case Distribution::kLargeQueryRope:
      // q_pe far larger than q_nope: the rope term dominates the scores, so the
      // bf16 rounding of q_pe / scale (Eq. 6) carries most of the score error.
      for (int64_t r = 0; r < rows; ++r)
        for (int j = 0; j < kRopeDim; ++j) w.q[r * kHeadDim + kNopeDim + j] *= static_cast<float>(kQueryRopeGain);
      break;
  }
  for (auto* v : {&w.q, &w.c_kv, &w.k_pe})
    for (float& x : *v) x = round_to_bf16(x);

  // Pages: exactly what each sequence needs plus extra_pages, in a random
  // order, so kernels cannot get correct answers from contiguous pages.
  std::vector<int> needed(spec.batch);
  int64_t total_pages = spec.extra_pages;
  w.max_pages = 1;
  for (int b = 0; b < spec.batch; ++b) {
    needed[b] = pages_for_tokens(spec.seqlens[b]);
    total_pages += needed[b];
    w.max_pages = std::max(w.max_pages, needed[b]);
  }
  w.num_pages = std::max<int64_t>(total_pages, 1);
  std::vector<int32_t> pages(w.num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  for (int64_t i = w.num_pages - 1; i > 0; --i)  // Fisher-Yates with portable draws
    std::swap(pages[i], pages[normal.bits() % static_cast<uint64_t>(i + 1)]);
  w.block_table.assign(static_cast<size_t>(spec.batch) * w.max_pages, 0);
  w.slot_mapping.resize(tokens);
  int64_t next_page = 0;
  for (int b = 0; b < spec.batch; ++b) {
    for (int p = 0; p < needed[b]; ++p) w.block_table[static_cast<size_t>(b) * w.max_pages + p] = pages[next_page++];
    for (int64_t t = 0; t < spec.seqlens[b]; ++t)
      w.slot_mapping[w.token_offset[b] + t] =
          w.block_table[static_cast<size_t>(b) * w.max_pages + t / kPageSize] * kPageSize + static_cast<int32_t>(t % kPageSize);
  }
  return w;
}

std::vector<double> sequence_keys(const Workload& w, int b) {
  const int64_t begin = w.token_offset[b], end = w.token_offset[b + 1];
  std::vector<double> keys(static_cast<size_t>(end - begin) * kHeadDim);
  for (int64_t t = begin; t < end; ++t) {
    double* dst = &keys[(t - begin) * kHeadDim];
    for (int i = 0; i < kNopeDim; ++i) dst[i] = w.c_kv[t * kNopeDim + i];
    for (int j = 0; j < kRopeDim; ++j) dst[kNopeDim + j] = w.k_pe[t * kRopeDim + j];
  }
  return keys;
}

}  // namespace snapmla::synthetic

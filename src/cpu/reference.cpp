// The float64 oracle for MLA decode. Scores, softmax and the weighted sum run
// in double over the cache exactly as stored (fp8 dequantized per token), so
// any difference from it is the kernel's own arithmetic or an emulated
// rounding switched on in Fp8Emulation.
#include "cpu/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/numeric.h"
#include "core/validate.h"
#include "cpu/host_tensor.h"
#include "cpu/token_quant.h"

namespace snapmla::reference {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// A sequence's keys as stored: `raw` holds the values before the per-token
// scale (fp8: e4m3 content and the bf16 rope; bf16: the values, scale 1).
struct SequenceKeys {
  std::vector<double> raw;    // [s_k, 576]
  std::vector<double> scale;  // [s_k]
};

SequenceKeys load_sequence(const KvCacheView& cache, const TensorView& block_table, int b, int64_t s_k) {
  SequenceKeys keys;
  keys.raw.resize(static_cast<size_t>(s_k) * kHeadDim);
  keys.scale.resize(s_k);
  const int64_t max_pages = block_table.shape[1], num_pages = cache.num_pages();
  if (s_k > max_pages * kPageSize)
    throw Error("cache_seqlens", "sequence " + std::to_string(b) + " has " + std::to_string(s_k) +
                                     " tokens but block_table rows hold " + std::to_string(max_pages) + " pages");
  for (int64_t t = 0; t < s_k; ++t) {
    const int64_t page = cpu::load_integer(block_table, cpu::element_offset(block_table, b, t / kPageSize));
    if (page < 0 || page >= num_pages)
      throw Error("block_table", "sequence " + std::to_string(b) + " page " + std::to_string(t / kPageSize) +
                                     " is " + std::to_string(page) + ", outside [0, " + std::to_string(num_pages) + ")");
    const int64_t slot = page * kPageSize + t % kPageSize;
    double* dst = &keys.raw[t * kHeadDim];
    if (cache.format == KvFormat::kBF16) {
      const uint16_t* src = cache.data.ptr<const uint16_t>() + slot * kHeadDim;
      for (int i = 0; i < kHeadDim; ++i) dst[i] = bf16_bits_to_float(src[i]);
      keys.scale[t] = 1.0;
    } else {
      const uint8_t* nope = cache.nope.ptr<const uint8_t>() + slot * kNopeDim;
      const uint16_t* rope = cache.rope.ptr<const uint16_t>() + slot * kRopeDim;
      for (int i = 0; i < kNopeDim; ++i) dst[i] = e4m3_bits_to_float(nope[i]);
      for (int j = 0; j < kRopeDim; ++j) dst[kNopeDim + j] = bf16_bits_to_float(rope[j]);
      keys.scale[t] = cache.scale.ptr<const float>()[slot];
    }
  }
  return keys;
}

// Query rows as doubles [b*s_q*h_q, 576], optionally through the fp8 query quantization.
std::vector<double> load_queries(const TensorView& q, bool quantize) {
  const int64_t batch = q.shape[0], s_q = q.shape[1], h_q = q.shape[2];
  std::vector<double> rows(static_cast<size_t>(batch * s_q * h_q) * kHeadDim);
  float row[kHeadDim];
  uint8_t nope8[kNopeDim];
  uint16_t rope16[kRopeDim];
  int64_t r = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < s_q; ++i)
      for (int64_t h = 0; h < h_q; ++h, ++r) {
        const int64_t base = cpu::element_offset(q, b, i, h);
        for (int d = 0; d < kHeadDim; ++d) row[d] = static_cast<float>(cpu::load_real(q, base + d * q.stride[3]));
        double* dst = &rows[r * kHeadDim];
        if (!quantize) {
          for (int d = 0; d < kHeadDim; ++d) dst[d] = cpu::load_real(q, base + d * q.stride[3]);
          continue;
        }
        const double scale = cpu::quantize_token(row, row + kNopeDim, nope8, rope16);
        for (int d = 0; d < kNopeDim; ++d) dst[d] = e4m3_bits_to_float(nope8[d]) * scale;
        for (int d = 0; d < kRopeDim; ++d) dst[kNopeDim + d] = bf16_bits_to_float(rope16[d]) * scale;
      }
  return rows;
}

// One query row against its visible keys; writes out[512] and returns the lse.
double attend_row(const double* q, const SequenceKeys& keys, int64_t visible, double softmax_scale,
                  bool quantize_p, double* out, std::vector<double>& scores) {
  std::fill(out, out + kHeadDimV, 0.0);
  if (visible == 0) return kNegInf;
  scores.resize(visible);
  for (int64_t t = 0; t < visible; ++t) {
    const double* k = &keys.raw[t * kHeadDim];
    double dot = 0.0;
    for (int d = 0; d < kHeadDim; ++d) dot += q[d] * k[d];
    scores[t] = dot * keys.scale[t] * softmax_scale;
  }

  if (!quantize_p) {
    const double m = *std::max_element(scores.begin(), scores.end());
    double sum = 0.0;
    for (int64_t t = 0; t < visible; ++t) {
      const double p = std::exp(scores[t] - m);
      sum += p;
      const double w = p * keys.scale[t];
      const double* v = &keys.raw[t * kHeadDim];
      for (int d = 0; d < kHeadDimV; ++d) out[d] += w * v[d];
    }
    for (int d = 0; d < kHeadDimV; ++d) out[d] /= sum;
    return m + std::log(sum);
  }

  // SnapMLA's PV pipeline, one 64-token page at a time in order: the V scale
  // is folded into P, P is quantized to e4m3 with one scale per page, and
  // that scale lives in the online-softmax state (see the design notes).
  double m = kNegInf, l = 0.0, s = 1.0;
  double x[kPageSize], e[kPageSize], f[kPageSize];
  for (int64_t begin = 0; begin < visible; begin += kPageSize) {
    const int n = static_cast<int>(std::min<int64_t>(kPageSize, visible - begin));
    double m_new = m;
    for (int j = 0; j < n; ++j) {
      x[j] = scores[begin + j] * kLog2e;
      m_new = std::max(m_new, x[j]);
    }
    double f_max = 0.0, e_sum = 0.0;
    for (int j = 0; j < n; ++j) {
      e[j] = std::exp2(x[j] - m_new);
      e_sum += e[j];
      f[j] = e[j] * keys.scale[begin + j];
      f_max = std::max(f_max, f[j]);
    }
    const double s_new = f_max > 0.0 ? f_max / kE4M3Max : 1.0;
    const double beta = std::exp2(m - m_new) * s / s_new;  // 0 on the first page (m = -inf)
    l = l * beta + e_sum / s_new;
    for (int d = 0; d < kHeadDimV; ++d) out[d] *= beta;
    for (int j = 0; j < n; ++j) {
      const double p_hat = round_to_e4m3(static_cast<float>(f[j] / s_new));
      const double* v = &keys.raw[(begin + j) * kHeadDim];
      for (int d = 0; d < kHeadDimV; ++d) out[d] += p_hat * v[d];
    }
    m = m_new;
    s = s_new;
  }
  for (int d = 0; d < kHeadDimV; ++d) out[d] /= l;
  return (m + std::log2(l * s)) * kLn2;
}

}  // namespace

DecodeResult decode_paged(const TensorView& q, const KvCacheView& cache, const TensorView& block_table,
                          const TensorView& cache_seqlens, double softmax_scale, bool causal,
                          Fp8Emulation emulation) {
  // Callers (tests, the CLI) pass host data directly, so the shapes the loops
  // rely on are checked here too.
  check::defined(q, "q");
  check::dtype(q, "q", {DType::kBFloat16, DType::kFloat32, DType::kFloat64});
  check::shape(q, "q", {check::kAny, check::kAny, check::kAny, kHeadDim});
  check::on_device(q, "q", Device::cpu());
  check::dtype(block_table, "block_table", {DType::kInt32});
  check::shape(block_table, "block_table", {q.shape[0], check::kAny});
  check::dtype(cache_seqlens, "cache_seqlens", {DType::kInt32});
  check::shape(cache_seqlens, "cache_seqlens", {q.shape[0]});
  const bool host_cache = cache.format == KvFormat::kBF16
                              ? cache.data.device.type == DeviceType::kCPU
                              : cache.nope.device.type == DeviceType::kCPU && cache.scale.device.type == DeviceType::kCPU &&
                                    cache.rope.device.type == DeviceType::kCPU;
  check::argument(host_cache, "cache", "the reference reads host memory");
  const int batch = static_cast<int>(q.shape[0]);
  const int s_q = static_cast<int>(q.shape[1]);
  const int h_q = static_cast<int>(q.shape[2]);
  const int rows_per_batch = s_q * h_q;
  const bool fp8 = cache.format == KvFormat::kFP8;
  // The bf16 cache path has no P quantization, so the flag means nothing there.
  const bool quantize_p = emulation.quantize_p && fp8;
  const std::vector<double> queries = load_queries(q, emulation.quantize_query);

  DecodeResult result;
  result.out.assign(static_cast<size_t>(batch) * rows_per_batch * kHeadDimV, 0.0);
  result.lse.assign(static_cast<size_t>(batch) * rows_per_batch, kNegInf);

  auto run_batch = [&](int64_t b, bool parallel_rows) {
    const int64_t s_k = std::max<int64_t>(0, cpu::load_integer(cache_seqlens, cpu::element_offset(cache_seqlens, b)));
    const SequenceKeys keys = load_sequence(cache, block_table, static_cast<int>(b), s_k);
    auto run_row = [&](int64_t r) {  // r = i * h_q + h
      const int i = static_cast<int>(r / h_q), h = static_cast<int>(r % h_q);
      std::vector<double> scores;
      const int64_t row = b * rows_per_batch + r;
      result.lse[(b * h_q + h) * s_q + i] =
          attend_row(&queries[row * kHeadDim], keys, visible_keys(s_k, s_q, i, causal), softmax_scale, quantize_p,
                     &result.out[row * kHeadDimV], scores);
    };
    if (parallel_rows) {
      cpu::parallel_for(rows_per_batch, run_row);
    } else {
      for (int64_t r = 0; r < rows_per_batch; ++r) run_row(r);
    }
  };
  // Whole sequences per thread when there are enough of them (each loads its
  // keys once); otherwise one sequence at a time with its rows in parallel.
  if (batch >= cpu::cpu_thread_count()) {
    cpu::parallel_for(batch, [&](int64_t b) { run_batch(b, false); });
  } else {
    for (int b = 0; b < batch; ++b) run_batch(b, true);
  }
  return result;
}

DecodeResult decode_dense(const std::vector<double>& q, int batch, int s_q, int h_q,
                          const std::vector<std::vector<double>>& keys, double softmax_scale, bool causal) {
  DecodeResult result;
  result.out.assign(static_cast<size_t>(batch) * s_q * h_q * kHeadDimV, 0.0);
  result.lse.assign(static_cast<size_t>(batch) * s_q * h_q, kNegInf);
  std::vector<double> scores;
  for (int b = 0; b < batch; ++b) {
    const int64_t s_k = static_cast<int64_t>(keys[b].size() / kHeadDim);
    for (int i = 0; i < s_q; ++i)
      for (int h = 0; h < h_q; ++h) {
        const int64_t row = (static_cast<int64_t>(b) * s_q + i) * h_q + h;
        const double* qr = &q[row * kHeadDim];
        const int64_t visible = visible_keys(s_k, s_q, i, causal);
        if (visible == 0) continue;
        scores.resize(visible);
        for (int64_t t = 0; t < visible; ++t) {
          double dot = 0.0;
          for (int d = 0; d < kHeadDim; ++d) dot += qr[d] * keys[b][t * kHeadDim + d];
          scores[t] = dot * softmax_scale;
        }
        const double m = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        double* out = &result.out[row * kHeadDimV];
        for (int64_t t = 0; t < visible; ++t) {
          const double p = std::exp(scores[t] - m);
          sum += p;
          for (int d = 0; d < kHeadDimV; ++d) out[d] += p * keys[b][t * kHeadDim + d];
        }
        for (int d = 0; d < kHeadDimV; ++d) out[d] /= sum;
        result.lse[(static_cast<int64_t>(b) * h_q + h) * s_q + i] = m + std::log(sum);
      }
  }
  return result;
}

ErrorStats compare(const std::vector<double>& got, const std::vector<double>& ref) {
  ErrorStats stats;
  double diff2 = 0, ref2 = 0, got2 = 0, dot = 0;
  const size_t n = std::min(got.size(), ref.size());
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) ++stats.nonfinite;
    const double d = got[i] - ref[i];
    diff2 += d * d;
    ref2 += ref[i] * ref[i];
    got2 += got[i] * got[i];
    dot += got[i] * ref[i];
    stats.max_abs = std::max(stats.max_abs, std::fabs(d));
    if (std::isnan(d)) stats.max_abs = d;
  }
  // Two zero vectors agree exactly; a zero against a non-zero is all error.
  stats.rel_l2 = ref2 > 0 ? std::sqrt(diff2 / ref2) : (diff2 > 0 ? std::numeric_limits<double>::infinity() : 0.0);
  stats.cosine = (ref2 > 0 && got2 > 0) ? dot / std::sqrt(ref2 * got2) : (ref2 == got2 ? 1.0 : 0.0);
  return stats;
}

ErrorStats compare_lse(const std::vector<double>& got, const std::vector<double>& ref) {
  ErrorStats stats;
  const size_t n = std::min(got.size(), ref.size());
  for (size_t i = 0; i < n; ++i) {
    if (std::isfinite(got[i]) != std::isfinite(ref[i])) ++stats.nonfinite;
    if (std::isfinite(ref[i])) {
      const double d = std::fabs(got[i] - ref[i]);
      stats.max_abs = std::isnan(d) ? d : std::max(stats.max_abs, d);
    }
  }
  return stats;
}

}  // namespace snapmla::reference

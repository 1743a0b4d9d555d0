// `snapmla accuracy`: the accuracy study of docs/accuracy.md. Every KV-cache
// scheme decodes the same synthetic inputs and is compared with the float64
// reference on the unquantized data, so the table shows what each format
// choice (RoPE precision, scale granularity, power-of-two scales) costs.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/decode_runner.h"
#include "cli/options.h"
#include "core/numeric.h"
#include "core/synthetic.h"
#include "cpu/cache_schemes.h"
#include "cpu/host_tensor.h"
#include "cpu/reference.h"
#include "snapmla/snapmla.h"

namespace snapmla::cli {
namespace {

using Keys = std::vector<std::vector<double>>;  // [batch][s_k * 576]
using TopTokens = std::vector<std::vector<int32_t>>;  // per query row, sorted token indices

constexpr int kTopKFloor = 16;  // attend-set size: max(16, 1% of the visible tokens)

int top_k_for(int64_t visible) {
  const int64_t k = std::max<int64_t>(kTopKFloor, (visible + 99) / 100);
  return static_cast<int>(std::min(k, visible));
}

// The k tokens each query row attends to most, by its attention probabilities
// (softmax is monotonic, so by its scores q.k * softmax_scale).
TopTokens top_attended_tokens(const std::vector<double>& q, const synthetic::WorkloadSpec& spec, const Keys& keys) {
  TopTokens top(static_cast<size_t>(spec.batch) * spec.s_q * spec.h_q);
  std::vector<double> scores;
  std::vector<int32_t> order;
  for (int b = 0; b < spec.batch; ++b) {
    const int64_t s_k = static_cast<int64_t>(keys[b].size() / kHeadDim);
    for (int i = 0; i < spec.s_q; ++i)
      for (int h = 0; h < spec.h_q; ++h) {
        const int64_t row = (static_cast<int64_t>(b) * spec.s_q + i) * spec.h_q + h;
        const int64_t visible = reference::visible_keys(s_k, spec.s_q, i, /*causal=*/true);
        if (visible == 0) continue;
        const double* qr = &q[row * kHeadDim];
        scores.resize(visible);
        for (int64_t t = 0; t < visible; ++t) {
          const double* k = &keys[b][t * kHeadDim];
          // Four partial sums: independent chains the CPU can overlap.
          double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
          for (int d = 0; d < kHeadDim; d += 4) {
            s0 += qr[d] * k[d];
            s1 += qr[d + 1] * k[d + 1];
            s2 += qr[d + 2] * k[d + 2];
            s3 += qr[d + 3] * k[d + 3];
          }
          scores[t] = (s0 + s1) + (s2 + s3);
        }
        const int k = top_k_for(visible);
        order.resize(visible);
        for (int64_t t = 0; t < visible; ++t) order[t] = static_cast<int32_t>(t);
        std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                         [&](int32_t a, int32_t c) { return scores[a] > scores[c] || (scores[a] == scores[c] && a < c); });
        top[row].assign(order.begin(), order.begin() + k);
        std::sort(top[row].begin(), top[row].end());
      }
  }
  return top;
}

struct Overlap {
  double mean = 0, min = 1;
};

Overlap top_k_overlap(const TopTokens& got, const TopTokens& ref) {
  Overlap o;
  int rows = 0;
  std::vector<int32_t> common;
  for (size_t r = 0; r < ref.size(); ++r) {
    if (ref[r].empty()) continue;
    common.clear();
    std::set_intersection(got[r].begin(), got[r].end(), ref[r].begin(), ref[r].end(), std::back_inserter(common));
    const double share = static_cast<double>(common.size()) / static_cast<double>(ref[r].size());
    o.mean += share;
    o.min = std::min(o.min, share);
    ++rows;
  }
  o.mean = rows ? o.mean / rows : 1.0;
  return o;
}

struct SchemeResult {
  std::string name;
  size_t bytes_per_token = 0;
  reference::DecodeResult decoded;
  std::optional<TopTokens> top;  // absent where per-token probabilities are not observable (GPU)
  std::string failure;           // non-empty when the scheme could not run (GPU errors)
};

struct Metrics {
  std::string name;
  size_t bytes_per_token = 0;
  reference::ErrorStats out, lse;
  std::optional<Overlap> overlap;
  std::string failure;
};

struct CaseResult {
  synthetic::Distribution distribution;
  int seq_len = 0;
  uint64_t seed = 0;
  int top_k = 0;
  std::vector<Metrics> metrics;
  double seconds = 0;
};

std::vector<double> as_doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The query rows the fp8 kernel multiplies with: quantize_query's e4m3 content
// and bf16 RoPE, both times the row scale.
std::vector<double> fp8_query_rows(const synthetic::Workload& w) {
  const auto& s = w.spec;
  const int64_t rows = static_cast<int64_t>(s.batch) * s.s_q * s.h_q;
  std::vector<uint16_t> q16(w.q.size());
  for (size_t i = 0; i < q16.size(); ++i) q16[i] = float_to_bf16_bits(w.q[i]);
  std::vector<uint8_t> nope(rows * kNopeDim);
  std::vector<float> scale(rows);
  std::vector<uint16_t> rope(rows * kRopeDim);
  const Device cpu = Device::cpu();
  quantize_query(TensorView::contiguous(q16.data(), DType::kBFloat16, cpu, {s.batch, s.s_q, s.h_q, kHeadDim}),
                 TensorView::contiguous(nope.data(), DType::kFloat8E4M3, cpu, {s.batch, s.s_q, s.h_q, kNopeDim}),
                 TensorView::contiguous(scale.data(), DType::kFloat32, cpu, {s.batch, s.s_q, s.h_q}),
                 TensorView::contiguous(rope.data(), DType::kBFloat16, cpu, {s.batch, s.s_q, s.h_q, kRopeDim}));
  std::vector<double> q(rows * kHeadDim);
  for (int64_t r = 0; r < rows; ++r) {
    for (int d = 0; d < kNopeDim; ++d) q[r * kHeadDim + d] = e4m3_bits_to_float(nope[r * kNopeDim + d]) * double{scale[r]};
    for (int d = 0; d < kRopeDim; ++d)
      q[r * kHeadDim + kNopeDim + d] = bf16_bits_to_float(rope[r * kRopeDim + d]) * double{scale[r]};
  }
  return q;
}

struct StudyConfig {
  int batch = 1;
  int heads = 16;
  std::vector<int> lengths;
  std::vector<synthetic::Distribution> distributions;
  uint64_t base_seed = 2026;
  bool fp8_compute = true;
  bool gpu = false;
};

uint64_t case_seed(const StudyConfig& cfg, size_t distribution_index, size_t length_index) {
  return cfg.base_seed + 100 * distribution_index + length_index;
}

CaseResult run_case(const StudyConfig& cfg, synthetic::Distribution distribution, int seq_len, uint64_t seed) {
  const auto start = std::chrono::steady_clock::now();
  synthetic::WorkloadSpec spec;
  spec.batch = cfg.batch;
  spec.h_q = cfg.heads;
  spec.s_q = 1;
  spec.seqlens.assign(cfg.batch, seq_len);
  spec.distribution = distribution;
  spec.seed = seed;
  const synthetic::Workload w = synthetic::make_workload(spec);
  const std::vector<double> q = as_doubles(w.q);
  const double softmax_scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));

  // The unquantized keys, and the snapmla format through the library:
  // write_kv_cache, then read back as stored. Independent, so side by side.
  Keys exact(cfg.batch), snap_keys(cfg.batch);
  HostKvCache fp8_cache(KvFormat::kFP8, 0);
  cpu::parallel_for(2, [&](int64_t job) {
    if (job == 0) {
      for (int b = 0; b < cfg.batch; ++b) exact[b] = synthetic::sequence_keys(w, b);
      return;
    }
    fp8_cache = host_kv_cache_from_workload(w, KvFormat::kFP8);
    for (int b = 0; b < cfg.batch; ++b)
      snap_keys[b] = schemes::dequantize_cache_tokens(fp8_cache.view(), &w.slot_mapping[w.token_offset[b]],
                                                      w.token_offset[b + 1] - w.token_offset[b]);
  });

  const std::vector<schemes::Scheme> fake = schemes::all_fake_quant_schemes();
  SchemeResult reference_result{"reference", 0, {}, {}, {}};
  std::vector<SchemeResult> results;
  for (schemes::Scheme s : fake) results.push_back({schemes::scheme_name(s), schemes::scheme_bytes_per_token(s), {}, {}, {}});
  const size_t snap_index = results.size();
  results.push_back({"snapmla-fp8", kv_bytes_per_token(KvFormat::kFP8), {}, {}, {}});
  // The kernel's two extra roundings, first the query's alone, then with P's.
  const size_t query_index = results.size();
  if (cfg.fp8_compute) results.push_back({"snapmla-fp8+fp8-query", kv_bytes_per_token(KvFormat::kFP8), {}, {}, {}});
  const size_t compute_index = results.size();
  if (cfg.fp8_compute) results.push_back({"snapmla-fp8+fp8-compute", kv_bytes_per_token(KvFormat::kFP8), {}, {}, {}});

  // decode_dense and the top-k pass are single-threaded: run independent jobs
  // side by side, the longest (fp8 fake quantization + decode) first so the
  // short top-k-only jobs fill in at the end (decode_paged below parallelises itself).
  std::vector<char> lossless(fake.size(), 0);
  std::vector<int> order;  // >= 0: index into `fake`; -1 reference; -2 / -3 snapmla top-k jobs
  for (size_t i = 0; i < fake.size(); ++i)
    if (fake[i] != schemes::Scheme::kBF16) order.push_back(static_cast<int>(i));
  order.push_back(-1);
  for (size_t i = 0; i < fake.size(); ++i)
    if (fake[i] == schemes::Scheme::kBF16) order.push_back(static_cast<int>(i));
  order.push_back(-2);
  if (cfg.fp8_compute) order.push_back(-3);
  cpu::parallel_for(static_cast<int64_t>(order.size()), [&](int64_t job) {
    const int what = order[job];
    if (what >= 0) {
      Keys keys = exact;
      schemes::fake_quantize(fake[what], keys);
      SchemeResult& r = results[what];
      // Lossless here (bf16 on bf16 inputs): same keys, same decode as the reference.
      if (keys == exact) {
        lossless[what] = 1;
        return;
      }
      r.decoded = reference::decode_dense(q, cfg.batch, 1, cfg.heads, keys, softmax_scale, true);
      r.top = top_attended_tokens(q, spec, keys);
    } else if (what == -1) {
      reference_result.decoded = reference::decode_dense(q, cfg.batch, 1, cfg.heads, exact, softmax_scale, true);
      reference_result.top = top_attended_tokens(q, spec, exact);
    } else if (what == -2) {
      results[snap_index].top = top_attended_tokens(q, spec, snap_keys);
    } else {
      // What the kernel ranks by: the fp8 query against the fp8 cache (P's own
      // quantization comes after the ranking and is left out of it).
      results[compute_index].top = top_attended_tokens(fp8_query_rows(w), spec, snap_keys);
    }
  });

  for (size_t i = 0; i < fake.size(); ++i)
    if (lossless[i]) {
      results[i].decoded = reference_result.decoded;
      results[i].top = reference_result.top;
    }

  const Device cpu = Device::cpu();
  auto q_view = TensorView::contiguous(const_cast<float*>(w.q.data()), DType::kFloat32, cpu, {cfg.batch, 1, cfg.heads, kHeadDim});
  auto table = TensorView::contiguous(const_cast<int32_t*>(w.block_table.data()), DType::kInt32, cpu, {cfg.batch, w.max_pages});
  auto seqlens = TensorView::contiguous(const_cast<int32_t*>(spec.seqlens.data()), DType::kInt32, cpu, {cfg.batch});
  results[snap_index].decoded = reference::decode_paged(q_view, fp8_cache.view(), table, seqlens, softmax_scale, true);
  if (cfg.fp8_compute) {
    results[query_index].decoded = reference::decode_paged(q_view, fp8_cache.view(), table, seqlens, softmax_scale,
                                                           true, reference::Fp8Emulation{true, false});
    results[query_index].top = results[compute_index].top;
    results[compute_index].decoded = reference::decode_paged(q_view, fp8_cache.view(), table, seqlens, softmax_scale,
                                                             true, reference::Fp8Emulation{true, true});
  }
  if (cfg.gpu) {
    SchemeResult gpu{"snapmla-fp8 GPU kernel", kv_bytes_per_token(KvFormat::kFP8), {}, {}, {}};
    try {
      GpuDecode decode(w, fp8_cache);
      decode.plan();
      decode.launch();
      DecodeOutput got = decode.download();
      gpu.decoded.out = std::move(got.out);
      gpu.decoded.lse = std::move(got.lse);
    } catch (const std::exception& e) {
      gpu.failure = e.what();
      std::fprintf(stderr, "snapmla accuracy: GPU kernel failed: %s\n", e.what());
    }
    results.push_back(std::move(gpu));
  }

  CaseResult c;
  c.distribution = distribution;
  c.seq_len = seq_len;
  c.seed = seed;
  c.top_k = top_k_for(seq_len);
  for (SchemeResult& r : results) {
    Metrics m;
    m.name = r.name;
    m.bytes_per_token = r.bytes_per_token;
    m.failure = r.failure;
    if (r.failure.empty()) {
      m.out = reference::compare(r.decoded.out, reference_result.decoded.out);
      m.lse = reference::compare_lse(r.decoded.lse, reference_result.decoded.lse);
      if (r.top) m.overlap = top_k_overlap(*r.top, *reference_result.top);
    }
    c.metrics.push_back(std::move(m));
  }
  c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return c;
}

void print_case(const CaseResult& c, const StudyConfig& cfg) {
  std::printf("\n%s, s_k %d, batch %d, h_q %d, seed %llu, top-k k = %d  (%.1f s)\n",
              synthetic::distribution_name(c.distribution), c.seq_len, cfg.batch, cfg.heads,
              static_cast<unsigned long long>(c.seed), c.top_k, c.seconds);
  std::printf("  %-26s %7s %11s %11s %11s %15s\n", "scheme", "B/token", "rel L2 err", "1 - cosine", "max|d lse|",
              "top-k mean/min");
  for (const Metrics& m : c.metrics) {
    if (!m.failure.empty()) {
      std::printf("  %-26s %7zu   failed: %s\n", m.name.c_str(), m.bytes_per_token, m.failure.c_str());
      continue;
    }
    char overlap[32] = "n/a";
    if (m.overlap) std::snprintf(overlap, sizeof overlap, "%.3f/%.3f", m.overlap->mean, m.overlap->min);
    std::printf("  %-26s %7zu %11.3e %11.3e %11.3e %15s%s\n", m.name.c_str(), m.bytes_per_token, m.out.rel_l2,
                1.0 - m.out.cosine, m.lse.max_abs, overlap,
                m.out.nonfinite + m.lse.nonfinite ? "  NON-FINITE" : "");
  }
}

void json_number(std::FILE* f, double x) {
  if (std::isfinite(x)) {
    std::fprintf(f, "%.9g", x);
  } else {
    std::fprintf(f, "null");
  }
}

void write_json(const std::string& path, const StudyConfig& cfg, const std::vector<CaseResult>& cases, double seconds) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("cannot write " + path);
  std::fprintf(f, "{\n  \"snapmla_version\": \"%s\",\n", kVersion);
  std::fprintf(f, "  \"config\": {\"batch\": %d, \"h_q\": %d, \"s_q\": 1, \"base_seed\": %llu, ", cfg.batch, cfg.heads,
               static_cast<unsigned long long>(cfg.base_seed));
  std::fprintf(f, "\"top_k_rule\": \"max(16, ceil(1%% of visible tokens))\", \"gpu\": %s},\n", cfg.gpu ? "true" : "false");
  std::fprintf(f, "  \"seconds\": %.3f,\n  \"cases\": [\n", seconds);
  for (size_t i = 0; i < cases.size(); ++i) {
    const CaseResult& c = cases[i];
    std::fprintf(f, "    {\"distribution\": \"%s\", \"seq_len\": %d, \"seed\": %llu, \"top_k\": %d, \"seconds\": %.3f,\n",
                 synthetic::distribution_name(c.distribution), c.seq_len, static_cast<unsigned long long>(c.seed),
                 c.top_k, c.seconds);
    std::fprintf(f, "     \"schemes\": [\n");
    for (size_t j = 0; j < c.metrics.size(); ++j) {
      const Metrics& m = c.metrics[j];
      std::fprintf(f, "       {\"name\": \"%s\", \"bytes_per_token\": %zu", m.name.c_str(), m.bytes_per_token);
      if (m.failure.empty()) {
        std::fprintf(f, ", \"rel_l2\": ");
        json_number(f, m.out.rel_l2);
        std::fprintf(f, ", \"cosine\": ");
        json_number(f, m.out.cosine);
        std::fprintf(f, ", \"max_abs_lse\": ");
        json_number(f, m.lse.max_abs);
        std::fprintf(f, ", \"nonfinite\": %lld", static_cast<long long>(m.out.nonfinite + m.lse.nonfinite));
        if (m.overlap) {
          std::fprintf(f, ", \"topk_overlap_mean\": ");
          json_number(f, m.overlap->mean);
          std::fprintf(f, ", \"topk_overlap_min\": ");
          json_number(f, m.overlap->min);
        }
      } else {
        std::string escaped;
        for (char ch : m.failure) {
          if (ch == '"' || ch == '\\') escaped += '\\';
          escaped += (ch == '\n' ? ' ' : ch);
        }
        std::fprintf(f, ", \"failure\": \"%s\"", escaped.c_str());
      }
      std::fprintf(f, "}%s\n", j + 1 < c.metrics.size() ? "," : "");
    }
    std::fprintf(f, "     ]}%s\n", i + 1 < cases.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  if (std::fclose(f) != 0) throw std::runtime_error("cannot write " + path);
}

std::vector<synthetic::Distribution> parse_distributions(const std::string& list) {
  if (list == "all") return synthetic::all_distributions();
  std::vector<synthetic::Distribution> out;
  size_t begin = 0;
  while (begin <= list.size()) {
    const size_t end = std::min(list.find(',', begin), list.size());
    synthetic::Distribution d;
    const std::string name = list.substr(begin, end - begin);
    if (!synthetic::parse_distribution(name, &d)) {
      std::string known;
      for (synthetic::Distribution k : synthetic::all_distributions()) known += std::string(" ") + synthetic::distribution_name(k);
      throw std::invalid_argument("--distributions: unknown '" + name + "' (known: all" + known + ")");
    }
    out.push_back(d);
    begin = end + 1;
  }
  return out;
}

}  // namespace

int run_accuracy(int argc, char** argv) {
  Options opt(argc, argv);
  std::string usage =
      "snapmla accuracy [--lengths 1024,8192,32768,131072] [--heads 16] [--batch 1] [--seed 2026]\n"
      "                 [--distributions all|NAME,...] [--json PATH] [--no-fp8-compute] [--no-gpu]\n"
      "  Decodes the same synthetic caches with several KV-cache schemes and reports, against a float64\n"
      "  reference on the unquantized data: output relative L2 error, 1 - cosine, max |lse error| and the\n"
      "  overlap of the top-k attended tokens (k = max(16, 1% of tokens)). Schemes: bf16; fp8 with one\n"
      "  scale per tensor or per token over all 576 dims; fp8 per 128-dim tile with power-of-two scales\n"
      "  and bf16 RoPE (FlashMLA's sparse layout); the snapmla fp8 format (written by write_kv_cache);\n"
      "  the same with the kernel's fp8 query rounding emulated, then with its P rounding too; and the\n"
      "  GPU kernel itself when a Hopper GPU is present.\n"
      "  Case i,j (distribution i, length j) uses seed SEED + 100*i + j.\n"
      "  Distributions: all";
  for (synthetic::Distribution d : synthetic::all_distributions()) usage += std::string(" ") + synthetic::distribution_name(d);
  usage += "\n  Details and results: docs/accuracy.md.\n";
  if (opt.handle_help(usage, {"lengths", "heads", "batch", "seed", "distributions", "json", "no-fp8-compute", "no-gpu"}))
    return 0;
  StudyConfig cfg;
  cfg.batch = static_cast<int>(opt.get_int("batch", 1));
  cfg.heads = static_cast<int>(opt.get_int("heads", 16));
  cfg.base_seed = static_cast<uint64_t>(opt.get_int("seed", 2026));
  for (long n : opt.get_int_list("lengths", {1024, 8192, 32768, 131072})) {
    if (n < 1 || n > (1L << 24)) throw std::invalid_argument("--lengths: each must be in 1..16777216, got " + std::to_string(n));
    cfg.lengths.push_back(static_cast<int>(n));
  }
  if (cfg.batch < 1 || cfg.batch > 64) throw std::invalid_argument("--batch must be in 1..64");
  if (cfg.heads < 1 || cfg.heads > 128) throw std::invalid_argument("--heads must be in 1..128");
  cfg.distributions = parse_distributions(opt.get("distributions", "all"));
  cfg.fp8_compute = !opt.has("no-fp8-compute");
  cfg.gpu = !opt.has("no-gpu") && hopper_available();

  std::printf("snapmla accuracy: KV-cache schemes vs a float64 reference on the unquantized data\n");
  std::printf("  batch %d, h_q %d, s_q 1, lengths", cfg.batch, cfg.heads);
  for (int n : cfg.lengths) std::printf(" %d", n);
  std::printf("; base seed %llu; GPU kernel: %s\n", static_cast<unsigned long long>(cfg.base_seed),
              cfg.gpu ? "yes" : "no (no Hopper GPU or --no-gpu)");

  const auto start = std::chrono::steady_clock::now();
  std::vector<CaseResult> cases;
  for (size_t i = 0; i < cfg.distributions.size(); ++i)
    for (size_t j = 0; j < cfg.lengths.size(); ++j) {
      // Seeds follow the distribution's position in the full list, so a
      // subset run reproduces the same cases as the full study.
      const auto all = synthetic::all_distributions();
      const size_t index = static_cast<size_t>(std::find(all.begin(), all.end(), cfg.distributions[i]) - all.begin());
      cases.push_back(run_case(cfg, cfg.distributions[i], cfg.lengths[j], case_seed(cfg, index, j)));
      print_case(cases.back(), cfg);
      std::fflush(stdout);
    }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("\n%zu cases in %.1f s\n", cases.size(), seconds);
  if (opt.has("json")) {
    const std::string path = opt.get("json", "");
    if (path.empty()) throw std::invalid_argument("--json needs a path");
    write_json(path, cfg, cases, seconds);
    std::printf("wrote %s\n", path.c_str());
  }
  bool any_nonfinite = false;
  for (const CaseResult& c : cases)
    for (const Metrics& m : c.metrics) any_nonfinite = any_nonfinite || m.out.nonfinite + m.lse.nonfinite > 0 || !m.failure.empty();
  return any_nonfinite ? 1 : 0;
}

}  // namespace snapmla::cli

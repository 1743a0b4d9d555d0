// `snapmla bench`: the decode kernels on FlashMLA's anchor configs, bf16 and
// fp8 side by side in one run, timed as the anchors were (CUDA events around
// 20 back-to-back calls of the whole decode, split-KV and combine included,
// after warm-up; median of 5 such groups). Every config reads more KV than
// the 50 MB L2 holds (>= 169 MB), so no cache rotation is needed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/anchors.h"
#include "cli/commands.h"
#include "cli/decode_runner.h"
#include "cli/options.h"

#if defined(SNAPMLA_WITH_CUDA)
#include <cuda_runtime.h>

#include "cuda/check.h"
#endif

namespace snapmla::cli {

namespace {

struct BenchConfig {
  std::string name;
  int batch, s_q, h_q;
  std::vector<int32_t> seqlens;
  const bench::AnchorRow* anchor;
};

std::vector<BenchConfig> bench_configs(bool quick) {
  std::vector<BenchConfig> configs;
  for (const auto& a : bench::kFlashMlaH100) {
    BenchConfig c{"", a.batch, a.s_q, a.h_q, std::vector<int32_t>(a.batch, a.s_k), &a};
    c.name = "b" + std::to_string(a.batch) + "_sq" + std::to_string(a.s_q) + "_h" + std::to_string(a.h_q) + "_sk" +
             std::to_string(a.s_k);
    configs.push_back(c);
    if (quick && configs.size() == 3) break;
  }
  // A serving-like batch: lengths log-normal around 4K, plus a few very long ones.
  BenchConfig v{"varlen_b128_h128", 128, 1, 128, {}, nullptr};
  std::mt19937_64 rng(7);
  std::lognormal_distribution<double> len(std::log(4096.0), 0.8);
  for (int b = 0; b < v.batch; ++b) v.seqlens.push_back(static_cast<int32_t>(std::clamp(len(rng), 1.0, 65536.0)));
  for (int b = 0; b < 4; ++b) v.seqlens[b * 31] = 65536;
  configs.push_back(v);
  return configs;
}

struct Timing {
  double us = 0, tflops = 0, gbps = 0;
};

#if defined(SNAPMLA_WITH_CUDA)

Timing time_decode(const BenchConfig& c, KvFormat format, HostKvCache& seed, int groups, int calls,
                   bool separate_query_quantization = false) {
  synthetic::WorkloadSpec spec;
  spec.batch = c.batch;
  spec.s_q = c.s_q;
  spec.h_q = c.h_q;
  spec.seqlens = c.seqlens;
  int64_t pool = 0;
  int max_pages = 1;
  for (int32_t s : c.seqlens) {
    const int pages = (s + kPageSize - 1) / kPageSize;
    pool += pages;
    max_pages = std::max(max_pages, pages);
  }
  // Pages of all sequences are a random permutation of the pool, as in a serving engine.
  std::vector<int32_t> perm(pool);
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 rng(11);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(static_cast<size_t>(c.batch) * max_pages, 0);
  int64_t next = 0;
  for (int b = 0; b < c.batch; ++b) {
    const int pages = (c.seqlens[b] + kPageSize - 1) / kPageSize;
    for (int p = 0; p < pages; ++p) table[static_cast<size_t>(b) * max_pages + p] = perm[next++];
  }
  std::vector<float> q(static_cast<size_t>(c.batch) * c.s_q * c.h_q * kHeadDim);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (float& x : q) x = std::clamp(normal(rng), -1.0f, 1.0f);

  GpuDecode run(spec, q, table, max_pages, seed, pool);
  if (separate_query_quantization) run.use_separate_query_quantization();
  run.plan();
  run.launch();  // checks indices once
  for (int i = 0; i < 5; ++i) run.launch();
  cudaEvent_t start, stop;
  SNAPMLA_CUDA_CHECK(cudaEventCreate(&start));
  SNAPMLA_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> per_call_us;
  for (int g = 0; g < groups; ++g) {
    SNAPMLA_CUDA_CHECK(cudaEventRecord(start));
    for (int i = 0; i < calls; ++i) run.launch();
    SNAPMLA_CUDA_CHECK(cudaEventRecord(stop));
    SNAPMLA_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    SNAPMLA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    per_call_us.push_back(1000.0 * ms / calls);
  }
  SNAPMLA_CUDA_CHECK(cudaEventDestroy(start));
  SNAPMLA_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(per_call_us.begin(), per_call_us.end());
  Timing t;
  t.us = per_call_us[per_call_us.size() / 2];
  double tokens = 0;
  for (int32_t s : c.seqlens) tokens += s;
  const double rows = static_cast<double>(c.s_q) * c.h_q;
  const double flops = tokens * rows * 2.0 * (kHeadDim + kHeadDimV);
  const double bytes = tokens * kv_bytes_per_token(format) + c.batch * rows * (kHeadDim + kHeadDimV) * 2.0;
  t.tflops = flops / (t.us * 1e-6) / 1e12;
  t.gbps = bytes / (t.us * 1e-6) / 1e9;
  return t;
}

#endif

}  // namespace

int run_bench(int argc, char** argv) {
  Options opt(argc, argv);
  const std::string usage =
      "snapmla bench [--format both|bf16|fp8] [--quick] [--only NAME] [--groups 5] [--calls 20] [--json PATH]\n"
      "  Times mla_decode (metadata excluded, split-KV + combine included) on FlashMLA's anchor configs\n"
      "  and a varlen batch, both cache formats in the same run, and prints us, TFLOP/s, GB/s, the\n"
      "  fp8/bf16 speed-up and the ratio to FlashMLA's measured H100 times; for fp8 also the decode fed\n"
      "  by a separate quantize_query kernel. Needs a Hopper GPU.\n"
      "  --only NAME runs one config (e.g. b64_sq1_h128_sk4096), for profiling.\n";
  if (opt.handle_help(usage, {"format", "quick", "only", "groups", "calls", "json"})) return 0;
#if !defined(SNAPMLA_WITH_CUDA)
  std::fprintf(stderr, "snapmla bench: built without CUDA\n");
  return 1;
#else
  if (!hopper_available()) {
    std::fprintf(stderr, "snapmla bench: no Hopper (sm90) GPU found\n");
    return 1;
  }
  const std::string which = opt.get("format", "both");
  std::vector<KvFormat> formats;
  if (which == "both" || which == "bf16") formats.push_back(KvFormat::kBF16);
  if (which == "both" || which == "fp8") formats.push_back(KvFormat::kFP8);
  if (formats.empty()) throw std::invalid_argument("--format must be both, bf16 or fp8");
  const int groups = static_cast<int>(opt.get_int("groups", 5));
  const int calls = static_cast<int>(opt.get_int("calls", 20));

  cudaDeviceProp prop{};
  SNAPMLA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("snapmla bench on %s (%d SMs)\n", prop.name, prop.multiProcessorCount);

  // One seed cache of 1024 distinct pages per format, tiled over each config's pool.
  synthetic::WorkloadSpec seed_spec;
  seed_spec.batch = 1;
  seed_spec.h_q = 1;
  seed_spec.seqlens = {1024 * kPageSize};
  seed_spec.seed = 3;
  const synthetic::Workload seed_workload = synthetic::make_workload(seed_spec);
  std::vector<HostKvCache> seeds;
  for (KvFormat f : formats) seeds.push_back(host_kv_cache_from_workload(seed_workload, f));

  std::string json = "{\n  \"device\": \"" + std::string(prop.name) + "\",\n  \"rows\": [\n";
  std::printf("\n%-24s %-5s %9s %8s %8s %9s %11s\n", "config", "fmt", "us", "TFLOP/s", "GB/s", "fp8/bf16",
              "vs FlashMLA");
  bool first_row = true;
  const bool fp8_in_run = formats.back() == KvFormat::kFP8;
  const std::string only = opt.get("only", "");
  for (const BenchConfig& c : bench_configs(opt.has("quick"))) {
    if (!only.empty() && c.name != only) continue;
    std::vector<Timing> t;
    for (size_t i = 0; i < formats.size(); ++i) t.push_back(time_decode(c, formats[i], seeds[i], groups, calls));
    for (size_t i = 0; i < formats.size(); ++i) {
      const bool fp8 = formats[i] == KvFormat::kFP8;
      const double speedup = (fp8 && formats.size() == 2) ? t[0].us / t[i].us : 0;
      const double vs_anchor = c.anchor ? c.anchor->flashmla_bf16_us / t[i].us : 0;
      std::printf("%-24s %-5s %9.1f %8.1f %8.0f %9s %11s\n", c.name.c_str(), kv_format_name(formats[i]), t[i].us,
                  t[i].tflops, t[i].gbps, speedup ? (std::to_string(speedup).substr(0, 5) + "x").c_str() : "",
                  vs_anchor ? (std::to_string(vs_anchor).substr(0, 5) + "x").c_str() : "");
      char row[512];
      std::snprintf(row, sizeof row,
                    "%s    {\"config\": \"%s\", \"batch\": %d, \"s_q\": %d, \"h_q\": %d, \"format\": \"%s\", "
                    "\"us\": %.3f, \"tflops\": %.2f, \"gbps\": %.1f, \"fp8_over_bf16\": %.4f, "
                    "\"flashmla_bf16_us\": %.3f, \"speedup_vs_flashmla_bf16\": %.4f}",
                    first_row ? "" : ",\n", c.name.c_str(), c.batch, c.s_q, c.h_q, kv_format_name(formats[i]),
                    t[i].us, t[i].tflops, t[i].gbps, speedup, c.anchor ? c.anchor->flashmla_bf16_us : 0.0,
                    vs_anchor);
      json += row;
      first_row = false;
    }
    // Where the fp8 query is quantized: in the decode's prologue (the default)
    // or by its own kernel first (SGLang-FluentLLM's call sequence).
    if (fp8_in_run) {
      const Timing sep = time_decode(c, KvFormat::kFP8, seeds.back(), groups, calls, true);
      std::printf("%-24s %-5s %9.1f %8s %8s %9s %11s  (quantize_query kernel + decode: %.2fx the prologue)\n",
                  c.name.c_str(), "fp8+q", sep.us, "", "", "", "", sep.us / t.back().us);
      char row[256];
      std::snprintf(row, sizeof row,
                    ",\n    {\"config\": \"%s\", \"format\": \"fp8-separate-query-quantization\", \"us\": %.3f}",
                    c.name.c_str(), sep.us);
      json += row;
    }
  }
  json += "\n  ]\n}\n";
  const std::string path = opt.get("json", "");
  if (!path.empty()) {
    std::ofstream(path) << json;
    std::printf("\nwrote %s\n", path.c_str());
  }
  return 0;
#endif
}

}  // namespace snapmla::cli

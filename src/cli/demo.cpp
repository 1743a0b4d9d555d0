// `snapmla demo`: one decode step of DeepSeek-V3's attention shape in both
// cache formats, checked against the float64 reference on the unquantized data.
#include <chrono>
#include <cmath>
#include <cstdio>

#include "cli/commands.h"
#include "cli/decode_runner.h"
#include "cli/options.h"
#include "cpu/reference.h"

namespace snapmla::cli {

namespace {

void print_error_line(const char* label, const reference::ErrorStats& e, const reference::ErrorStats& lse) {
  std::printf("  %-5s rel. L2 error %.2e   cosine %.6f   max |lse err| %.2e   non-finite %lld\n", label, e.rel_l2,
              e.cosine, lse.max_abs, static_cast<long long>(e.nonfinite + lse.nonfinite));
}

}  // namespace

int run_demo(int argc, char** argv) {
  Options opt(argc, argv);
  const std::string usage =
      "snapmla demo [--cpu] [--batch B] [--seqlen S] [--heads H] [--seed N]\n"
      "  Runs one MLA decode step (absorbed DeepSeek-V3 attention: H query heads, 512 + 64 latent dims)\n"
      "  over a paged cache in the bf16 and the fp8 format, on the GPU when a Hopper GPU is present\n"
      "  (else, or with --cpu, on the CPU reference backend at a smaller size), and reports each\n"
      "  format's bytes per token and its output error against a float64 reference computed on the\n"
      "  unquantized inputs.\n";
  if (opt.handle_help(usage, {"cpu", "batch", "seqlen", "heads", "seed"})) return 0;
  const bool on_gpu = !opt.has("cpu") && hopper_available();
  synthetic::WorkloadSpec spec;
  spec.batch = static_cast<int>(opt.get_int("batch", on_gpu ? 16 : 2));
  spec.h_q = static_cast<int>(opt.get_int("heads", 128));
  spec.s_q = 1;
  spec.seed = static_cast<uint64_t>(opt.get_int("seed", 2026));
  const long seqlen = opt.get_int("seqlen", on_gpu ? 4096 : 700);
  // Varied lengths around the requested one, as in a real decode batch.
  for (int b = 0; b < spec.batch; ++b) spec.seqlens.push_back(static_cast<int32_t>(seqlen - (b * 37) % (seqlen / 2 + 1)));

  std::printf("snapmla demo: MLA decode step, DeepSeek-V3 attention shape\n");
  std::printf("  device: %s\n", on_gpu ? "GPU (sm90 kernels)" : "CPU reference backend (no Hopper GPU, smaller size)");
  std::printf("  batch %d, query heads %d, q/k dims 576 (512 latent + 64 RoPE), v dims 512, s_q %d, seqlens %d..%d\n",
              spec.batch, spec.h_q, spec.s_q, spec.seqlens.back(), spec.seqlens.front());
  std::printf("  inputs: randn/10 clamped to [-1, 1] (FlashMLA's test distribution), seed %llu\n",
              static_cast<unsigned long long>(spec.seed));
  const synthetic::Workload w = synthetic::make_workload(spec);

  std::vector<std::vector<double>> keys(spec.batch);
  for (int b = 0; b < spec.batch; ++b) keys[b] = synthetic::sequence_keys(w, b);
  std::vector<double> q64(w.q.begin(), w.q.end());
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  const reference::DecodeResult ref =
      reference::decode_dense(q64, spec.batch, spec.s_q, spec.h_q, keys, scale, /*causal=*/true);

  int64_t tokens = 0;
  for (int32_t s : spec.seqlens) tokens += s;
  std::printf("\n  format  bytes/token  cache for this batch\n");
  for (KvFormat f : {KvFormat::kBF16, KvFormat::kFP8})
    std::printf("  %-6s  %11zu  %8.1f MiB\n", kv_format_name(f), kv_bytes_per_token(f),
                static_cast<double>(tokens) * kv_bytes_per_token(f) / (1 << 20));

  std::printf("\n  output vs float64 reference on the unquantized data:\n");
  for (KvFormat f : {KvFormat::kBF16, KvFormat::kFP8}) {
    HostKvCache cache = host_kv_cache_from_workload(w, f);
    DecodeOutput got;
    double millis = 0;
    const auto t0 = std::chrono::steady_clock::now();
    if (on_gpu) {
      GpuDecode gpu(w, cache);
      gpu.plan();
      gpu.launch();
      got = gpu.download();
    } else {
      got = decode_on_cpu(w, cache);
    }
    millis = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    print_error_line(kv_format_name(f), reference::compare(got.out, ref.out), reference::compare_lse(got.lse, ref.lse));
    std::printf("        (wall time of this first call, set-up included: %.1f ms; see `snapmla bench` for kernel timings)\n",
                millis);
  }
  return 0;
}

}  // namespace snapmla::cli

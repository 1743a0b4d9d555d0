// `snapmla kv-bench`: the cache write and gather kernels' time and achieved
// bandwidth, measured through the public API (see kv_throughput.h for the
// method).
#include "bench/kv_throughput.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/anchors.h"
#include "cli/commands.h"
#include "cli/options.h"
#include "core/numeric.h"
#include "snapmla/snapmla.h"

#if defined(SNAPMLA_WITH_CUDA)
#include <cuda_runtime.h>

#include "cuda/check.h"
#endif

namespace snapmla::bench {

#if defined(SNAPMLA_WITH_CUDA)
namespace {

constexpr double kMinPoolBytes = 256e6;  // > 5x the 50 MB L2
constexpr int kSlotSets = 8;             // a different set of slots on consecutive calls
constexpr int kWarmupCalls = kSlotSets;  // also writes every set once before any gather

class DeviceMemory {
 public:
  explicit DeviceMemory(size_t bytes) {
    SNAPMLA_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)));
    SNAPMLA_CUDA_CHECK(cudaMemset(ptr_, 0, std::max<size_t>(bytes, 1)));
  }
  ~DeviceMemory() { cudaFree(ptr_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* get() const { return ptr_; }
  template <typename T>
  void upload(const std::vector<T>& host) {
    SNAPMLA_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }

 private:
  void* ptr_ = nullptr;
};

struct DeviceCache {
  std::vector<std::unique_ptr<DeviceMemory>> buffers;
  KvCacheView view;

  DeviceCache(KvFormat format, int64_t pages) {
    const Device gpu = Device::cuda(0);
    auto alloc = [&](size_t bytes) {
      buffers.push_back(std::make_unique<DeviceMemory>(bytes));
      return buffers.back()->get();
    };
    const int64_t slots = pages * kPageSize;
    if (format == KvFormat::kBF16) {
      view = KvCacheView::bf16(alloc(slots * kHeadDim * 2), pages, gpu);
    } else {
      void* nope = alloc(slots * kNopeDim);
      void* scale = alloc(slots * 4);
      view = KvCacheView::fp8(nope, scale, alloc(slots * kRopeDim * 2), pages, gpu);
    }
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// Times `call(i)` for i = 0..repeats-1, each between its own pair of events.
// All calls are queued behind a host function that holds the stream until
// the queue is complete, so the GPU runs them back to back and the events
// measure device time, not the host's launch latency.
template <typename Call>
std::vector<double> time_calls(int repeats, Call&& call) {
  std::vector<cudaEvent_t> start(repeats), stop(repeats);
  for (int i = 0; i < repeats; ++i) {
    SNAPMLA_CUDA_CHECK(cudaEventCreate(&start[i]));
    SNAPMLA_CUDA_CHECK(cudaEventCreate(&stop[i]));
  }
  // The hold gives up after a few seconds, so a call that synchronises
  // (it should not) makes the timing worse instead of deadlocking.
  struct Hold {
    std::atomic<bool> queued{false};
    std::chrono::steady_clock::time_point deadline;
  } hold;
  hold.deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  SNAPMLA_CUDA_CHECK(cudaLaunchHostFunc(
      nullptr,
      [](void* p) {
        const auto* h = static_cast<const Hold*>(p);
        while (!h->queued.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < h->deadline) {
        }
      },
      &hold));
  for (int i = 0; i < repeats; ++i) {
    SNAPMLA_CUDA_CHECK(cudaEventRecord(start[i], nullptr));
    call(i);
    SNAPMLA_CUDA_CHECK(cudaEventRecord(stop[i], nullptr));
  }
  hold.queued.store(true, std::memory_order_release);
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> us(repeats);
  for (int i = 0; i < repeats; ++i) {
    float ms = 0;
    SNAPMLA_CUDA_CHECK(cudaEventElapsedTime(&ms, start[i], stop[i]));
    us[i] = ms * 1e3;
    SNAPMLA_CUDA_CHECK(cudaEventDestroy(start[i]));
    SNAPMLA_CUDA_CHECK(cudaEventDestroy(stop[i]));
  }
  return us;
}

// kSlotSets sets of n distinct slots each, drawn at random from the pool: [kSlotSets, n] int32.
std::vector<int32_t> random_slot_sets(int64_t n, int64_t num_slots, std::mt19937_64& rng) {
  std::vector<int32_t> pool(num_slots);
  std::iota(pool.begin(), pool.end(), 0);
  std::vector<int32_t> sets;
  sets.reserve(kSlotSets * n);
  for (int r = 0; r < kSlotSets; ++r) {
    for (int64_t i = 0; i < n; ++i) {  // partial Fisher-Yates: pool[0, n) becomes a fresh sample
      std::uniform_int_distribution<int64_t> pick(i, num_slots - 1);
      std::swap(pool[i], pool[pick(rng)]);
    }
    sets.insert(sets.end(), pool.begin(), pool.begin() + n);
  }
  return sets;
}

}  // namespace

std::vector<KvThroughputRow> measure_kv_throughput(const std::vector<int64_t>& token_counts,
                                                   const std::vector<KvFormat>& formats, int repeats) {
  if (repeats < 20) throw Error("repeats", "must be at least 20, got " + std::to_string(repeats));
  if (!hopper_available()) throw Error("no Hopper (sm90) GPU found");
  int64_t max_tokens = 1;
  for (int64_t n : token_counts) {
    if (n < 1 || n > (int64_t{1} << 24)) throw Error("tokens", "each count must be in 1..16777216");
    max_tokens = std::max(max_tokens, n);
  }

  // randn/10 in bf16, like FlashMLA's test data; one set shared by all runs.
  std::mt19937_64 rng(2024);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  std::vector<uint16_t> host_rows(max_tokens * kHeadDim);
  for (auto& v : host_rows) v = float_to_bf16_bits(normal(rng));
  const Device gpu = Device::cuda(0);
  DeviceMemory rows(host_rows.size() * 2), k_nope_out(max_tokens * kNopeDim * 2), k_pe_out(max_tokens * kRopeDim * 2);
  rows.upload(host_rows);
  // c_kv and k_pe as the two slices of one fused [n, 576] projection output.
  auto input_rows = [&](int64_t n, int64_t first, int64_t width) {
    TensorView v = TensorView::contiguous(static_cast<uint16_t*>(rows.get()) + first, DType::kBFloat16, gpu, {n, width});
    v.stride[0] = kHeadDim;
    return v;
  };

  std::vector<KvThroughputRow> results;
  for (KvFormat format : formats) {
    for (int64_t n : token_counts) {
      const int64_t min_slots = std::max<int64_t>(4 * n, static_cast<int64_t>(kMinPoolBytes / kv_bytes_per_token(format)));
      const int64_t pages = (min_slots + kPageSize - 1) / kPageSize;
      DeviceCache cache(format, pages);
      const std::vector<int32_t> host_sets = random_slot_sets(n, pages * kPageSize, rng);
      DeviceMemory slot_sets(host_sets.size() * 4);
      slot_sets.upload(host_sets);
      auto slots = [&](int i) {
        return TensorView::contiguous(static_cast<int32_t*>(slot_sets.get()) + (i % kSlotSets) * n, DType::kInt32, gpu, {n});
      };
      const TensorView c_kv = input_rows(n, 0, kNopeDim), k_pe = input_rows(n, kNopeDim, kRopeDim);
      const TensorView k_nope_view = TensorView::contiguous(k_nope_out.get(), DType::kBFloat16, gpu, {n, kNopeDim});
      const TensorView k_pe_view = TensorView::contiguous(k_pe_out.get(), DType::kBFloat16, gpu, {n, kRopeDim});
      auto write = [&](int i) { write_kv_cache(c_kv, k_pe, slots(i), cache.view); };
      auto gather = [&](int i) { gather_kv_cache(cache.view, slots(i), k_nope_view, k_pe_view); };

      for (int i = 0; i < kWarmupCalls; ++i) write(i);
      const std::vector<double> write_us = time_calls(repeats, write);
      for (int i = 0; i < kWarmupCalls; ++i) gather(i);
      const std::vector<double> gather_us = time_calls(repeats, gather);

      KvThroughputRow row;
      row.tokens = n;
      row.format = format;
      row.write_us = median(write_us);
      row.gather_us = median(gather_us);
      const double cache_row = static_cast<double>(kv_bytes_per_token(format));
      const double bf16_row = kHeadDim * 2.0, index = 4.0;
      row.write_bytes = n * (bf16_row + index + cache_row);
      row.gather_bytes = n * (cache_row + index + bf16_row);
      results.push_back(row);
    }
  }
  return results;
}
#else
std::vector<KvThroughputRow> measure_kv_throughput(const std::vector<int64_t>&, const std::vector<KvFormat>&, int) {
  throw Error("snapmla was built without CUDA");
}
#endif

}  // namespace snapmla::bench

namespace snapmla::cli {

int run_kv_bench(int argc, char** argv) {
  Options opt(argc, argv);
  char copy_rate[32];
  std::snprintf(copy_rate, sizeof copy_rate, "%.2f", bench::kH100CopyTBps);
  const std::string usage =
      "snapmla kv-bench [--tokens 1,128,4096,65536] [--format both|bf16|fp8] [--repeats 30] [--json PATH]\n"
      "  Times write_kv_cache (bf16 inputs, no RoPE) and gather_kv_cache on the GPU: median device time of\n"
      "  each call over the repeats, bytes moved (read + written), GB/s and % of the measured H100 copy\n"
      "  bandwidth (" + std::string(copy_rate) + " TB/s). The cache pool is >= 256 MB (5x L2), slots spread over it at random.\n";
  if (opt.handle_help(usage, {"tokens", "format", "repeats", "json"})) return 0;
  std::vector<int64_t> tokens;
  for (long n : opt.get_int_list("tokens", {1, 128, 4096, 65536})) tokens.push_back(n);
  const std::string which = opt.get("format", "both");
  std::vector<KvFormat> formats;
  if (which == "both" || which == "bf16") formats.push_back(KvFormat::kBF16);
  if (which == "both" || which == "fp8") formats.push_back(KvFormat::kFP8);
  if (formats.empty()) throw std::invalid_argument("--format must be both, bf16 or fp8");
  const int repeats = static_cast<int>(opt.get_int("repeats", 30));
  if (!built_with_cuda()) {
    std::fprintf(stderr, "snapmla kv-bench: built without CUDA\n");
    return 1;
  }

  const std::vector<bench::KvThroughputRow> rows = bench::measure_kv_throughput(tokens, formats, repeats);
  const double peak_gbps = bench::kH100CopyTBps * 1e3;
  std::printf("%8s %-5s %10s %10s %8s %7s %10s %10s %8s %7s\n", "tokens", "fmt", "write_us", "write_MB", "GB/s",
              "%peak", "gather_us", "gather_MB", "GB/s", "%peak");
  std::string json = "{\n  \"peak_copy_gbps\": " + std::to_string(peak_gbps) + ",\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    std::printf("%8lld %-5s %10.2f %10.3f %8.1f %6.1f%% %10.2f %10.3f %8.1f %6.1f%%\n",
                static_cast<long long>(r.tokens), kv_format_name(r.format), r.write_us, r.write_bytes / 1e6,
                r.write_gbps(), 100.0 * r.write_gbps() / peak_gbps, r.gather_us, r.gather_bytes / 1e6,
                r.gather_gbps(), 100.0 * r.gather_gbps() / peak_gbps);
    char line[512];
    std::snprintf(line, sizeof line,
                  "    {\"tokens\": %lld, \"format\": \"%s\", \"write_us\": %.3f, \"write_bytes\": %.0f, "
                  "\"write_gbps\": %.1f, \"gather_us\": %.3f, \"gather_bytes\": %.0f, \"gather_gbps\": %.1f}%s\n",
                  static_cast<long long>(r.tokens), kv_format_name(r.format), r.write_us, r.write_bytes,
                  r.write_gbps(), r.gather_us, r.gather_bytes, r.gather_gbps(), i + 1 < rows.size() ? "," : "");
    json += line;
  }
  json += "  ]\n}\n";
  const std::string path = opt.get("json", "");
  if (!path.empty()) {
    std::ofstream out(path);
    if (!(out << json)) throw std::runtime_error("cannot write " + path);
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}

}  // namespace snapmla::cli

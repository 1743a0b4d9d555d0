// Runs one decode problem from a synthetic workload on the CPU backend or the
// GPU, for the demo and the benchmark (one place that builds caches and
// moves them to the device).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/synthetic.h"
#include "cpu/host_kv_cache.h"
#include "snapmla/snapmla.h"

namespace snapmla::cli {

struct DecodeOutput {
  std::vector<double> out;  // [b, s_q, h_q, 512]
  std::vector<double> lse;  // [b, h_q, s_q]
};

DecodeOutput decode_on_cpu(const synthetic::Workload& w, HostKvCache& cache);

// A decode problem resident on the GPU, ready to be launched repeatedly.
class GpuDecode {
 public:
  GpuDecode(const synthetic::Workload& w, HostKvCache& cache);
  // A pool of `pool_pages` pages filled by repeating `seed`'s pages: large
  // benchmark caches without generating every token on the host.
  GpuDecode(const synthetic::WorkloadSpec& spec, const std::vector<float>& q, const std::vector<int32_t>& block_table,
            int max_pages, HostKvCache& seed, int64_t pool_pages);
  ~GpuDecode();
  GpuDecode(const GpuDecode&) = delete;
  GpuDecode& operator=(const GpuDecode&) = delete;

  void plan();                         // get_mla_metadata (once per batch shape)
  void launch(void* stream = nullptr);  // mla_decode only
  // fp8 only: quantize q with its own kernel (quantize_query) and hand the
  // decode the pre-quantized query, instead of quantizing in the decode's prologue.
  void use_separate_query_quantization();
  DecodeOutput download() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace snapmla::cli

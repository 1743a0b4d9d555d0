// Throughput of the cache write (quantize + scatter) and the gather
// (fetch + dequantize) through the public API on CUDA views; `snapmla
// kv-bench` prints these rows.
#pragma once

#include <cstdint>
#include <vector>

#include "snapmla/kv_format.h"

namespace snapmla::bench {

struct KvThroughputRow {
  int64_t tokens = 0;
  KvFormat format = KvFormat::kBF16;
  double write_us = 0, gather_us = 0;  // median over the repeats
  double write_bytes = 0;              // bf16 c_kv + k_pe + int32 slots read, cache rows written
  double gather_bytes = 0;             // cache rows + int32 indices read, bf16 k_nope + k_pe written
  double write_gbps() const { return write_bytes / (write_us * 1e3); }
  double gather_gbps() const { return gather_bytes / (gather_us * 1e3); }
};

// Times write_kv_cache and gather_kv_cache on device 0 for each token count
// and format: bf16 inputs, no RoPE, slots spread at random over a pool of at
// least 256 MB (5x the H100's 50 MB L2) and a different slot set on each
// repeat, so the cache traffic reaches HBM. Each call is timed on its own
// with CUDA events after warm-up; the median of `repeats` (>= 20) is kept.
// Needs a Hopper GPU (throws snapmla::Error otherwise).
std::vector<KvThroughputRow> measure_kv_throughput(const std::vector<int64_t>& token_counts,
                                                   const std::vector<KvFormat>& formats, int repeats);

}  // namespace snapmla::bench

// A paged cache held in host memory: the CPU backend's storage in tests, the
// CLI and the benchmark's seed pages. Filled only through write_kv_cache.
#pragma once

#include <cstdint>
#include <vector>

#include "core/synthetic.h"
#include "snapmla/kv_format.h"

namespace snapmla {

struct HostKvCache {
  KvFormat format;
  int64_t num_pages;
  std::vector<uint16_t> data;  // bf16 format
  std::vector<uint8_t> nope;   // fp8 format
  std::vector<float> scale;    // fp8 format
  std::vector<uint16_t> rope;  // fp8 format

  // Every slot starts as NaN (bf16/fp32 quiet NaN, e4m3 0x7f), so a read of an
  // unwritten slot shows up in any result.
  HostKvCache(KvFormat format, int64_t num_pages);
  KvCacheView view();
};

// The workload's tokens written at its slot mapping through snapmla::write_kv_cache.
HostKvCache host_kv_cache_from_workload(const synthetic::Workload& w, KvFormat format);

// bf16 bit patterns of float values (round to nearest even).
std::vector<uint16_t> to_bf16_bits(const std::vector<float>& values);

}  // namespace snapmla

// Host-memory paged caches and bf16 buffers for the CPU tests.
#pragma once

#include <cstdint>
#include <vector>

#include "core/numeric.h"
#include "core/synthetic.h"
#include "cpu/host_kv_cache.h"
#include "snapmla/kv_cache.h"
#include "snapmla/kv_format.h"

namespace snapmla::testing {

// The tests' names for the library's host cache (src/cpu/host_kv_cache.h).
using HostCache = HostKvCache;
inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) { return to_bf16_bits(v); }
inline HostCache cache_from_workload(const synthetic::Workload& w, KvFormat format) {
  return host_kv_cache_from_workload(w, format);
}

}  // namespace snapmla::testing

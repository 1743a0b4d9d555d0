// Element access to CPU tensor views and a small parallel loop, shared by the
// CPU backend and the reference (views arrive validated, so no checks here).
#pragma once

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "core/numeric.h"
#include "snapmla/tensor.h"

namespace snapmla::cpu {

// `offset` is in elements and already includes the strides.
inline double load_real(const TensorView& t, int64_t offset) {
  switch (t.dtype) {
    case DType::kBFloat16: return bf16_bits_to_float(t.ptr<const uint16_t>()[offset]);
    case DType::kFloat32: return t.ptr<const float>()[offset];
    case DType::kFloat64: return t.ptr<const double>()[offset];
    case DType::kFloat8E4M3: return e4m3_bits_to_float(t.ptr<const uint8_t>()[offset]);
    default: return 0.0;  // the validators admit no other floating dtype here
  }
}

inline int64_t load_integer(const TensorView& t, int64_t offset) {
  return t.dtype == DType::kInt64 ? t.ptr<const int64_t>()[offset] : t.ptr<const int32_t>()[offset];
}

// Element offset of index (i0, i1, ...) of a view of rank <= 4.
inline int64_t element_offset(const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) {
  const int64_t idx[4] = {i0, i1, i2, i3};
  int64_t off = 0;
  for (int d = 0; d < t.rank; ++d) off += idx[d] * t.stride[d];
  return off;
}

// The CPUs this process may run on (its affinity mask, which containers and
// taskset narrow), not every CPU of the host.
inline int cpu_thread_count() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// Runs body(i) for i in [0, n) on up to cpu_thread_count() threads; the first
// exception thrown by any body is rethrown on the calling thread.
template <typename Body>
void parallel_for(int64_t n, Body&& body) {
  const int threads = static_cast<int>(std::min<int64_t>(n, cpu_thread_count()));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    try {
      for (int64_t i = next++; i < n; i = next++) body(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next = n;
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // No more threads to be had (a pids limit): the ones started and this one finish the work.
  }
  worker();
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace snapmla::cpu

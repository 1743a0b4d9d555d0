// Host-memory paged caches and bf16 buffers for the CPU tests.
#pragma once

#include <cstdint>
#include <vector>

#include "core/numeric.h"
#include "core/synthetic.h"
#include "snapmla/kv_cache.h"
#include "snapmla/kv_format.h"

namespace snapmla::testing {

// Unwritten slots hold NaN everywhere, so reading one shows up in any result.
struct HostCache {
  KvFormat format;
  int64_t num_pages;
  std::vector<uint16_t> data;
  std::vector<uint8_t> nope;
  std::vector<float> scale;
  std::vector<uint16_t> rope;

  HostCache(KvFormat f, int64_t pages) : format(f), num_pages(pages) {
    const size_t slots = static_cast<size_t>(pages) * kPageSize;
    if (f == KvFormat::kBF16) {
      data.assign(slots * kHeadDim, 0x7fc0);
    } else {
      nope.assign(slots * kNopeDim, 0x7f);
      scale.assign(slots, bits_float(0x7fc00000u));
      rope.assign(slots * kRopeDim, 0x7fc0);
    }
  }

  KvCacheView view() {
    KvCacheView v;
    v.format = format;
    const Device cpu = Device::cpu();
    if (format == KvFormat::kBF16) {
      v.data = TensorView::contiguous(data.data(), DType::kBFloat16, cpu, {num_pages, kPageSize, 1, kHeadDim});
    } else {
      v.nope = TensorView::contiguous(nope.data(), DType::kFloat8E4M3, cpu, {num_pages, kPageSize, 1, kNopeDim});
      v.scale = TensorView::contiguous(scale.data(), DType::kFloat32, cpu, {num_pages, kPageSize, 1, 1});
      v.rope = TensorView::contiguous(rope.data(), DType::kBFloat16, cpu, {num_pages, kPageSize, 1, kRopeDim});
    }
    return v;
  }
};

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = float_to_bf16_bits(v[i]);
  return out;
}

// A workload's tokens written into a fresh cache through the public API.
inline HostCache cache_from_workload(synthetic::Workload& w, KvFormat format) {
  HostCache cache(format, w.num_pages);
  const int64_t n = static_cast<int64_t>(w.slot_mapping.size());
  const Device cpu = Device::cpu();
  write_kv_cache(TensorView::contiguous(w.c_kv.data(), DType::kFloat32, cpu, {n, kNopeDim}),
                 TensorView::contiguous(w.k_pe.data(), DType::kFloat32, cpu, {n, kRopeDim}),
                 TensorView::contiguous(w.slot_mapping.data(), DType::kInt32, cpu, {n}), cache.view());
  return cache;
}

}  // namespace snapmla::testing

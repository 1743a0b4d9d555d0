#include "cpu/host_kv_cache.h"

#include "core/numeric.h"
#include "snapmla/kv_cache.h"

namespace snapmla {

HostKvCache::HostKvCache(KvFormat f, int64_t pages) : format(f), num_pages(pages) {
  const size_t slots = static_cast<size_t>(pages) * kPageSize;
  constexpr uint16_t kBf16NaN = 0x7fc0;
  if (f == KvFormat::kBF16) {
    data.assign(slots * kHeadDim, kBf16NaN);
  } else {
    nope.assign(slots * kNopeDim, 0x7f);
    scale.assign(slots, bits_float(0x7fc00000u));
    rope.assign(slots * kRopeDim, kBf16NaN);
  }
}

KvCacheView HostKvCache::view() {
  return format == KvFormat::kBF16 ? KvCacheView::bf16(data.data(), num_pages, Device::cpu())
                                   : KvCacheView::fp8(nope.data(), scale.data(), rope.data(), num_pages, Device::cpu());
}

HostKvCache host_kv_cache_from_workload(const synthetic::Workload& w, KvFormat format) {
  HostKvCache cache(format, w.num_pages);
  const int64_t n = static_cast<int64_t>(w.slot_mapping.size());
  if (n == 0) return cache;
  const Device cpu = Device::cpu();
  write_kv_cache(TensorView::contiguous(const_cast<float*>(w.c_kv.data()), DType::kFloat32, cpu, {n, kNopeDim}),
                 TensorView::contiguous(const_cast<float*>(w.k_pe.data()), DType::kFloat32, cpu, {n, kRopeDim}),
                 TensorView::contiguous(const_cast<int32_t*>(w.slot_mapping.data()), DType::kInt32, cpu, {n}),
                 cache.view());
  return cache;
}

std::vector<uint16_t> to_bf16_bits(const std::vector<float>& values) {
  std::vector<uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = float_to_bf16_bits(values[i]);
  return out;
}

}  // namespace snapmla

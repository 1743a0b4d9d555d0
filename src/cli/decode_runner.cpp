#include "cli/decode_runner.h"

#include <algorithm>
#include <cstring>

#include "core/numeric.h"
#if defined(SNAPMLA_WITH_CUDA)
#include <cuda_runtime.h>

#include "cuda/check.h"
#endif

namespace snapmla::cli {

DecodeOutput decode_on_cpu(const synthetic::Workload& w, HostKvCache& cache) {
  const auto& s = w.spec;
  const Device cpu = Device::cpu();
  std::vector<uint16_t> q = to_bf16_bits(w.q);
  std::vector<uint16_t> out(static_cast<size_t>(s.batch) * s.s_q * s.h_q * kHeadDimV);
  std::vector<float> lse(static_cast<size_t>(s.batch) * s.h_q * s.s_q);
  DecodeParams p;
  p.q = TensorView::contiguous(q.data(), DType::kBFloat16, cpu, {s.batch, s.s_q, s.h_q, kHeadDim});
  p.cache = cache.view();
  p.block_table = TensorView::contiguous(const_cast<int32_t*>(w.block_table.data()), DType::kInt32, cpu,
                                         {s.batch, w.max_pages});
  p.cache_seqlens = TensorView::contiguous(const_cast<int32_t*>(s.seqlens.data()), DType::kInt32, cpu, {s.batch});
  p.out = TensorView::contiguous(out.data(), DType::kBFloat16, cpu, {s.batch, s.s_q, s.h_q, kHeadDimV});
  p.lse = TensorView::contiguous(lse.data(), DType::kFloat32, cpu, {s.batch, s.h_q, s.s_q});
  mla_decode(p);
  DecodeOutput r;
  r.out.resize(out.size());
  for (size_t i = 0; i < out.size(); ++i) r.out[i] = bf16_bits_to_float(out[i]);
  r.lse.assign(lse.begin(), lse.end());
  return r;
}

#if defined(SNAPMLA_WITH_CUDA)

namespace {

// Device memory owned for the lifetime of a GpuDecode.
struct DeviceBytes {
  void* ptr = nullptr;
  size_t size = 0;
  DeviceBytes() = default;
  explicit DeviceBytes(size_t n) : size(n) { SNAPMLA_CUDA_CHECK(cudaMalloc(&ptr, n > 0 ? n : 1)); }
  DeviceBytes(const void* host, size_t n) : DeviceBytes(n) {
    if (n) SNAPMLA_CUDA_CHECK(cudaMemcpy(ptr, host, n, cudaMemcpyHostToDevice));
  }
  DeviceBytes(DeviceBytes&& o) noexcept : ptr(o.ptr), size(o.size) { o.ptr = nullptr; }
  DeviceBytes& operator=(DeviceBytes&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(size, o.size);
    return *this;
  }
  ~DeviceBytes() {
    if (ptr) cudaFree(ptr);
  }
};

template <typename T>
DeviceBytes upload(const std::vector<T>& v) {
  return DeviceBytes(v.data(), v.size() * sizeof(T));
}

}  // namespace

struct GpuDecode::Impl {
  synthetic::WorkloadSpec spec;
  int max_pages = 0;
  KvFormat format;
  DeviceBytes q, data, nope, scale, rope, block_table, seqlens, out, lse, metadata, num_splits, workspace;
  DeviceBytes q_nope, q_scale, q_rope;
  DecodeParams params;
  TensorView q_bf16;  // kept when the query is quantized by its own kernel
};

GpuDecode::GpuDecode(const synthetic::Workload& w, HostKvCache& cache)
    : GpuDecode(w.spec, w.q, w.block_table, w.max_pages, cache, cache.num_pages) {}

namespace {

// Device copy of `host` repeated until it fills `total_elems` elements.
template <typename T>
DeviceBytes upload_tiled(const std::vector<T>& host, size_t total_elems) {
  DeviceBytes d(total_elems * sizeof(T));
  const size_t chunk = host.size();
  for (size_t at = 0; at < total_elems && chunk > 0; at += chunk) {
    const size_t n = std::min(chunk, total_elems - at);
    SNAPMLA_CUDA_CHECK(cudaMemcpy(static_cast<T*>(d.ptr) + at, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  return d;
}

}  // namespace

GpuDecode::GpuDecode(const synthetic::WorkloadSpec& s, const std::vector<float>& q,
                     const std::vector<int32_t>& block_table, int max_pages, HostKvCache& seed, int64_t pool_pages)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.spec = s;
  m.max_pages = max_pages;
  m.format = seed.format;
  const Device gpu = Device::cuda(0);
  m.q = upload(to_bf16_bits(q));
  m.block_table = upload(block_table);
  m.seqlens = upload(s.seqlens);
  const size_t slots = static_cast<size_t>(pool_pages) * kPageSize;
  if (seed.format == KvFormat::kBF16) {
    m.data = upload_tiled(seed.data, slots * kHeadDim);
    m.params.cache = KvCacheView::bf16(m.data.ptr, pool_pages, gpu);
  } else {
    m.nope = upload_tiled(seed.nope, slots * kNopeDim);
    m.scale = upload_tiled(seed.scale, slots);
    m.rope = upload_tiled(seed.rope, slots * kRopeDim);
    m.params.cache = KvCacheView::fp8(m.nope.ptr, m.scale.ptr, m.rope.ptr, pool_pages, gpu);
  }
  const int rows = s.s_q * s.h_q;
  const int parts = decode_num_sm_parts(gpu, rows);
  m.out = DeviceBytes(static_cast<size_t>(s.batch) * rows * kHeadDimV * 2);
  m.lse = DeviceBytes(static_cast<size_t>(s.batch) * rows * 4);
  m.metadata = DeviceBytes(static_cast<size_t>(parts) * 8 * 4);
  m.num_splits = DeviceBytes(static_cast<size_t>(s.batch + 1) * 4);
  m.workspace = DeviceBytes(decode_workspace_bytes(s.batch, s.s_q, s.h_q, parts));
  DecodeParams& p = m.params;
  p.q = TensorView::contiguous(m.q.ptr, DType::kBFloat16, gpu, {s.batch, s.s_q, s.h_q, kHeadDim});
  p.block_table = TensorView::contiguous(m.block_table.ptr, DType::kInt32, gpu, {s.batch, max_pages});
  p.cache_seqlens = TensorView::contiguous(m.seqlens.ptr, DType::kInt32, gpu, {s.batch});
  p.out = TensorView::contiguous(m.out.ptr, DType::kBFloat16, gpu, {s.batch, s.s_q, s.h_q, kHeadDimV});
  p.lse = TensorView::contiguous(m.lse.ptr, DType::kFloat32, gpu, {s.batch, s.h_q, s.s_q});
  p.schedule.tile_scheduler_metadata = TensorView::contiguous(m.metadata.ptr, DType::kInt32, gpu, {parts, 8});
  p.schedule.num_splits = TensorView::contiguous(m.num_splits.ptr, DType::kInt32, gpu, {s.batch + 1});
  p.workspace = TensorView::contiguous(m.workspace.ptr, DType::kUInt8, gpu,
                                       {static_cast<int64_t>(m.workspace.size)});
  p.causal = true;
  // The first launch checks the indices on the host; later (timed) launches skip that round trip.
  p.check_indices = true;
}

GpuDecode::~GpuDecode() = default;

void GpuDecode::plan() {
  get_mla_metadata(impl_->params.cache_seqlens, impl_->spec.s_q * impl_->spec.h_q, impl_->params.schedule);
}

void GpuDecode::launch(void* stream) {
  DecodeParams& p = impl_->params;
  if (p.q_nope.defined()) quantize_query(impl_->q_bf16, p.q_nope, p.q_scale, p.q_rope, stream);
  mla_decode(p, stream);
  p.check_indices = false;
}

void GpuDecode::use_separate_query_quantization() {
  Impl& m = *impl_;
  if (m.format != KvFormat::kFP8) throw Error("format", "a separate query quantization needs the fp8 cache");
  const auto& s = m.spec;
  const Device gpu = Device::cuda(0);
  const int64_t rows = static_cast<int64_t>(s.batch) * s.s_q * s.h_q;
  m.q_nope = DeviceBytes(rows * kNopeDim);
  m.q_scale = DeviceBytes(rows * sizeof(float));
  m.q_rope = DeviceBytes(rows * kRopeDim * 2);
  DecodeParams& p = m.params;
  m.q_bf16 = p.q;
  p.q_nope = TensorView::contiguous(m.q_nope.ptr, DType::kFloat8E4M3, gpu, {s.batch, s.s_q, s.h_q, kNopeDim});
  p.q_scale = TensorView::contiguous(m.q_scale.ptr, DType::kFloat32, gpu, {s.batch, s.s_q, s.h_q});
  p.q_rope = TensorView::contiguous(m.q_rope.ptr, DType::kBFloat16, gpu, {s.batch, s.s_q, s.h_q, kRopeDim});
}

DecodeOutput GpuDecode::download() const {
  const Impl& m = *impl_;
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(m.out.size / 2);
  std::vector<float> lse(m.lse.size / 4);
  SNAPMLA_CUDA_CHECK(cudaMemcpy(out.data(), m.out.ptr, m.out.size, cudaMemcpyDeviceToHost));
  SNAPMLA_CUDA_CHECK(cudaMemcpy(lse.data(), m.lse.ptr, m.lse.size, cudaMemcpyDeviceToHost));
  DecodeOutput r;
  r.out.resize(out.size());
  for (size_t i = 0; i < out.size(); ++i) r.out[i] = bf16_bits_to_float(out[i]);
  r.lse.assign(lse.begin(), lse.end());
  return r;
}

#else

struct GpuDecode::Impl {};
GpuDecode::GpuDecode(const synthetic::Workload& w, HostKvCache& cache)
    : GpuDecode(w.spec, w.q, w.block_table, w.max_pages, cache, cache.num_pages) {}
GpuDecode::GpuDecode(const synthetic::WorkloadSpec&, const std::vector<float>&, const std::vector<int32_t>&, int,
                     HostKvCache&, int64_t) {
  throw Error("snapmla was built without CUDA");
}
GpuDecode::~GpuDecode() = default;
void GpuDecode::plan() {}
void GpuDecode::launch(void*) {}
void GpuDecode::use_separate_query_quantization() {}
DecodeOutput GpuDecode::download() const { return {}; }

#endif

}  // namespace snapmla::cli

// The public entry points: validate every argument (errors name it), then run
// the CPU reference backend or the sm90 kernels by the tensors' device.
#include <cmath>
#include <cstdint>
#include <string>

#include "core/schedule.h"
#include "core/validate.h"
#include "cpu/backend.h"
#include "snapmla/decode.h"
#include "snapmla/kv_cache.h"
#include "snapmla/version.h"
#if defined(SNAPMLA_WITH_CUDA)
#include "cuda/backend.h"
#endif

namespace snapmla {
namespace {

using check::kAny;

[[noreturn, maybe_unused]] void no_cuda() { throw Error("snapmla was built without CUDA"); }

bool on_cuda(Device device) { return device.type == DeviceType::kCUDA; }

// All CUDA entry points start here: a clear error on a non-Hopper GPU.
void prepare_cuda(Device device, const char* argument) {
#if defined(SNAPMLA_WITH_CUDA)
  cuda::require_hopper(device, argument);
#else
  (void)device;
  (void)argument;
  no_cuda();
#endif
}

void tensor(const TensorView& t, const char* name, std::initializer_list<DType> dtypes,
            std::initializer_list<int64_t> shape, Device device) {
  check::defined(t, name);
  check::dtype(t, name, dtypes);
  check::shape(t, name, shape);
  check::on_device(t, name, device);
}

// Contiguous tensor of exact dtype/shape on `device`.
void dense(const TensorView& t, const char* name, std::initializer_list<DType> dtypes,
           std::initializer_list<int64_t> shape, Device device) {
  tensor(t, name, dtypes, shape, device);
  check::contiguous(t, name);
}

// [n, width] rows with a contiguous last dim and non-overlapping rows: the
// c_kv / k_pe slices of a fused [n, 576] projection are accepted as they are.
void row_major_rows(const TensorView& t, const char* name, std::initializer_list<DType> dtypes, int64_t n,
                    int64_t width, Device device) {
  tensor(t, name, dtypes, {n, width}, device);
  check::inner_contiguous(t, name);
  check::argument(n <= 1 || t.stride[0] >= width, name,
                  "rows overlap (stride " + std::to_string(t.stride[0]) + " < " + std::to_string(width) + ")");
}

// A 1-D index vector: one element per token, contiguous.
void index_vector(const TensorView& t, const char* name, int64_t n, Device device) {
  dense(t, name, {DType::kInt32, DType::kInt64}, {n}, device);
}

// TMA copies need 16-byte aligned global addresses.
void tma_aligned(const TensorView& t, const char* name) {
  if (on_cuda(t.device))
    check::argument(reinterpret_cast<uintptr_t>(t.data) % 16 == 0, name, "must be 16-byte aligned");
}

// Validates the cache's tensors and returns their device.
Device validate_cache(const KvCacheView& cache) {
  if (cache.format == KvFormat::kBF16) {
    const Device device = cache.data.device;
    dense(cache.data, "cache.data", {DType::kBFloat16}, {kAny, kPageSize, 1, kHeadDim}, device);
    check::argument(cache.data.shape[0] >= 1, "cache.data", "needs at least one page");
    tma_aligned(cache.data, "cache.data");
    return device;
  }
  check::argument(cache.format == KvFormat::kFP8, "cache.format", "is neither bf16 nor fp8");
  const Device device = cache.nope.device;
  dense(cache.nope, "cache.nope", {DType::kFloat8E4M3}, {kAny, kPageSize, 1, kNopeDim}, device);
  const int64_t pages = cache.nope.shape[0];
  check::argument(pages >= 1, "cache.nope", "needs at least one page");
  dense(cache.scale, "cache.scale", {DType::kFloat32}, {pages, kPageSize, 1, 1}, device);
  dense(cache.rope, "cache.rope", {DType::kBFloat16}, {pages, kPageSize, 1, kRopeDim}, device);
  tma_aligned(cache.nope, "cache.nope");
  tma_aligned(cache.scale, "cache.scale");
  tma_aligned(cache.rope, "cache.rope");
  return device;
}

// s_q and h_q limits of the decode kernels (FlashMLA's MTP and head counts).
void query_dims(const char* name, int64_t batch, int64_t s_q, int64_t h_q) {
  check::argument(batch >= 1, name, [&] { return "batch (dim 0) must be at least 1, got " + std::to_string(batch); });
  check::argument(s_q >= 1 && s_q <= kMaxQueryLen, name,
                  "s_q (dim 1) must be in 1.." + std::to_string(kMaxQueryLen) + ", got " + std::to_string(s_q));
  check::argument(h_q >= 1 && h_q <= 128, name, [&] { return "h_q (dim 2) must be in 1..128, got " + std::to_string(h_q); });
  check::argument(h_q * s_q <= kMaxQueryRows, name,
                  "h_q * s_q must be at most " + std::to_string(kMaxQueryRows) + ", got " + std::to_string(h_q * s_q));
}

void q_rows_range(int q_rows) {
  check::argument(q_rows >= 1 && q_rows <= kMaxQueryRows, "q_rows",
                  "must be in 1.." + std::to_string(kMaxQueryRows) + " (s_q * h_q), got " + std::to_string(q_rows));
}

[[maybe_unused]] int ceil_div(int a, int b) { return (a + b - 1) / b; }

void validate_schedule(const DecodeSchedule& schedule, int64_t batch, Device device) {
  dense(schedule.tile_scheduler_metadata, "tile_scheduler_metadata", {DType::kInt32},
        {kAny, kScheduleMetadataFields}, device);
  check::argument(schedule.tile_scheduler_metadata.shape[0] >= 1, "tile_scheduler_metadata",
                  "needs at least one SM part");
  dense(schedule.num_splits, "num_splits", {DType::kInt32}, {batch + 1}, device);
}

}  // namespace

bool built_with_cuda() {
#if defined(SNAPMLA_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

bool hopper_available() {
#if defined(SNAPMLA_WITH_CUDA)
  return cuda::hopper_available();
#else
  return false;
#endif
}

void write_kv_cache(const TensorView& c_kv, const TensorView& k_pe, const TensorView& slot_mapping,
                    const KvCacheView& cache, const KvWriteOptions& options, StreamHandle stream) {
  const Device device = validate_cache(cache);
  check::defined(c_kv, "c_kv");
  check::argument(c_kv.rank == 2, "c_kv", [&] { return "expected shape [n, 512], got " + c_kv.shape_string(); });
  const int64_t n = c_kv.shape[0];
  row_major_rows(c_kv, "c_kv", {DType::kBFloat16, DType::kFloat32}, n, kNopeDim, device);
  row_major_rows(k_pe, "k_pe", {DType::kBFloat16, DType::kFloat32}, n, kRopeDim, device);
  index_vector(slot_mapping, "slot_mapping", n, device);
  switch (options.rope) {
    case RopeStyle::kNone:
      // Rotation data without a rotation style is a caller's mistake, not a no-op.
      check::argument(!options.positions.defined() && !options.cos_sin.defined(), "rope",
                      "is none, but positions/cos_sin were given: name the RoPE style (interleaved or neox)");
      break;
    case RopeStyle::kInterleaved:
    case RopeStyle::kNeox:
      index_vector(options.positions, "positions", n, device);
      dense(options.cos_sin, "cos_sin", {DType::kFloat32}, {kAny, kRopeDim}, device);
      check::argument(options.cos_sin.shape[0] >= 1, "cos_sin", "needs at least one position");
      break;
    default: check::argument(false, "rope", "is not a RopeStyle value");
  }
  if (options.nonfinite_count.defined()) dense(options.nonfinite_count, "nonfinite_count", {DType::kInt32}, {1}, device);

  if (on_cuda(device)) {
    prepare_cuda(device, "cache");
#if defined(SNAPMLA_WITH_CUDA)
    cuda::write_kv_cache(c_kv, k_pe, slot_mapping, cache, options, stream);
#endif
    return;
  }
  (void)stream;
  cpu::write_kv_cache(c_kv, k_pe, slot_mapping, cache, options);
}

void gather_kv_cache(const KvCacheView& cache, const TensorView& indices, const TensorView& k_nope,
                     const TensorView& k_pe, StreamHandle stream) {
  const Device device = validate_cache(cache);
  check::defined(indices, "indices");
  check::argument(indices.rank == 1, "indices", [&] { return "expected shape [n], got " + indices.shape_string(); });
  const int64_t n = indices.shape[0];
  index_vector(indices, "indices", n, device);
  row_major_rows(k_nope, "k_nope", {DType::kBFloat16}, n, kNopeDim, device);
  row_major_rows(k_pe, "k_pe", {DType::kBFloat16}, n, kRopeDim, device);

  if (on_cuda(device)) {
    prepare_cuda(device, "cache");
#if defined(SNAPMLA_WITH_CUDA)
    cuda::gather_kv_cache(cache, indices, k_nope, k_pe, stream);
#endif
    return;
  }
  (void)stream;
  cpu::gather_kv_cache(cache, indices, k_nope, k_pe);
}

void quantize_query(const TensorView& q, const TensorView& q_nope, const TensorView& q_scale,
                    const TensorView& q_rope, StreamHandle stream) {
  check::defined(q, "q");
  check::argument(q.rank == 4, "q", [&] { return "expected shape [b, s_q, h_q, 576], got " + q.shape_string(); });
  const Device device = q.device;
  dense(q, "q", {DType::kBFloat16}, {kAny, kAny, kAny, kHeadDim}, device);
  const int64_t b = q.shape[0], s_q = q.shape[1], h_q = q.shape[2];
  query_dims("q", b, s_q, h_q);
  dense(q_nope, "q_nope", {DType::kFloat8E4M3}, {b, s_q, h_q, kNopeDim}, device);
  dense(q_scale, "q_scale", {DType::kFloat32}, {b, s_q, h_q}, device);
  dense(q_rope, "q_rope", {DType::kBFloat16}, {b, s_q, h_q, kRopeDim}, device);

  if (on_cuda(device)) {
    prepare_cuda(device, "q");
#if defined(SNAPMLA_WITH_CUDA)
    cuda::quantize_query(q, q_nope, q_scale, q_rope, stream);
#endif
    return;
  }
  (void)stream;
  cpu::quantize_query(q, q_nope, q_scale, q_rope);
}

int decode_num_sm_parts(Device device, int q_rows) {
  q_rows_range(q_rows);
  if (!on_cuda(device)) return 1;  // the CPU backend ignores the schedule
  prepare_cuda(device, "device");
#if defined(SNAPMLA_WITH_CUDA)
  const int tiles = ceil_div(q_rows, 64);  // one CTA covers 64 query rows
  const int parts = cuda::multiprocessor_count(device.index) / tiles;
  return parts > 1 ? parts : 1;
#else
  return 1;
#endif
}

void get_mla_metadata(const TensorView& cache_seqlens, int q_rows, const DecodeSchedule& schedule,
                      StreamHandle stream) {
  q_rows_range(q_rows);
  check::defined(cache_seqlens, "cache_seqlens");
  const Device device = cache_seqlens.device;
  dense(cache_seqlens, "cache_seqlens", {DType::kInt32}, {kAny}, device);
  const int64_t batch = cache_seqlens.shape[0];
  check::argument(batch >= 1, "cache_seqlens", "needs at least one sequence");
  validate_schedule(schedule, batch, device);

  if (on_cuda(device)) {
    prepare_cuda(device, "cache_seqlens");
#if defined(SNAPMLA_WITH_CUDA)
    cuda::get_mla_metadata(cache_seqlens, q_rows, schedule, stream);
#endif
    return;
  }
  (void)stream;
  const int32_t* seqlens = cache_seqlens.ptr<const int32_t>();
  for (int64_t b = 0; b < batch; ++b)
    check::argument(seqlens[b] >= 0, "cache_seqlens",
                    "sequence " + std::to_string(b) + " has negative length " + std::to_string(seqlens[b]));
  cpu::get_mla_metadata(cache_seqlens, q_rows, schedule);
}

size_t decode_workspace_bytes(int batch, int s_q, int h_q, int num_sm_parts) {
  check::argument(batch >= 1, "batch", [&] { return "must be at least 1, got " + std::to_string(batch); });
  check::argument(s_q >= 1 && s_q <= kMaxQueryLen, "s_q", [&] { return "must be in 1..4, got " + std::to_string(s_q); });
  check::argument(h_q >= 1 && h_q <= 128, "h_q", [&] { return "must be in 1..128, got " + std::to_string(h_q); });
  check::argument(num_sm_parts >= 1, "num_sm_parts", [&] { return "must be at least 1, got " + std::to_string(num_sm_parts); });
  // Each split of a row keeps its partial O (512 fp32) and lse (fp32); a
  // sequence has at most one split per part plus its own first piece.
  const size_t rows = static_cast<size_t>(s_q) * static_cast<size_t>(h_q);
  const size_t splits = static_cast<size_t>(batch) + static_cast<size_t>(num_sm_parts);
  const size_t bytes = splits * rows * (size_t{kHeadDimV} * sizeof(float) + sizeof(float));
  return (bytes + 255) / 256 * 256;
}

void mla_decode(const DecodeParams& params, StreamHandle stream) {
  const KvCacheView& cache = params.cache;
  const Device device = validate_cache(cache);
  const bool fp8 = cache.format == KvFormat::kFP8;
  const bool prequantized = params.q_nope.defined();

  // The query's shape comes from q, or from q_nope when only the pre-quantized form is given.
  const TensorView& shape_source = prequantized && !params.q.defined() ? params.q_nope : params.q;
  const char* shape_name = &shape_source == &params.q ? "q" : "q_nope";
  check::defined(shape_source, shape_name);
  check::argument(shape_source.rank == 4, shape_name,
                  "expected shape [b, s_q, h_q, *], got " + shape_source.shape_string());
  const int64_t b = shape_source.shape[0], s_q = shape_source.shape[1], h_q = shape_source.shape[2];
  query_dims(shape_name, b, s_q, h_q);
  if (params.q.defined()) dense(params.q, "q", {DType::kBFloat16}, {b, s_q, h_q, kHeadDim}, device);
  if (prequantized) {
    check::argument(fp8, "q_nope", "a pre-quantized query needs the fp8 cache format");
    dense(params.q_nope, "q_nope", {DType::kFloat8E4M3}, {b, s_q, h_q, kNopeDim}, device);
    dense(params.q_scale, "q_scale", {DType::kFloat32}, {b, s_q, h_q}, device);
    dense(params.q_rope, "q_rope", {DType::kBFloat16}, {b, s_q, h_q, kRopeDim}, device);
  } else {
    check::argument(!params.q_scale.defined() && !params.q_rope.defined(), "q_nope",
                    "q_scale/q_rope were given without q_nope");
  }

  dense(params.block_table, "block_table", {DType::kInt32}, {b, kAny}, device);
  check::argument(params.block_table.shape[1] >= 1, "block_table", "needs at least one page per sequence");
  dense(params.cache_seqlens, "cache_seqlens", {DType::kInt32}, {b}, device);
  dense(params.out, "out", {DType::kBFloat16}, {b, s_q, h_q, kHeadDimV}, device);
  dense(params.lse, "lse", {DType::kFloat32}, {b, h_q, s_q}, device);
  check::argument(std::isfinite(params.softmax_scale) && params.softmax_scale >= 0.0f, "softmax_scale",
                  "must be a positive finite number, or 0 for 1/sqrt(576), got " +
                      std::to_string(params.softmax_scale));


  const bool cuda_device = on_cuda(device);
  // The CPU backend ignores the schedule and the workspace; check them when given.
  const bool has_schedule =
      params.schedule.tile_scheduler_metadata.defined() || params.schedule.num_splits.defined();
  if (cuda_device || has_schedule) validate_schedule(params.schedule, b, device);
  // The workspace size depends on the schedule's part count.
  if (cuda_device || (has_schedule && params.workspace.defined())) {
    dense(params.workspace, "workspace", {DType::kUInt8}, {kAny}, device);
    const size_t needed = decode_workspace_bytes(static_cast<int>(b), static_cast<int>(s_q), static_cast<int>(h_q),
                                                 static_cast<int>(params.schedule.tile_scheduler_metadata.shape[0]));
    check::argument(params.workspace.nbytes() >= needed, "workspace",
                    "has " + std::to_string(params.workspace.nbytes()) + " bytes, needs " + std::to_string(needed) +
                        " (decode_workspace_bytes)");
  }

  if (cuda_device) {
    prepare_cuda(device, "q");
#if defined(SNAPMLA_WITH_CUDA)
    DecodeParams resolved = params;
    if (resolved.softmax_scale == 0.0f) resolved.softmax_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    cuda::mla_decode(resolved, stream);
#endif
    return;
  }
  (void)stream;
  // The CPU reads the cache directly, so indices are always checked there.
  // CPU only: the CUDA backend copies the indices to the host first (under check_indices).
  check::paged_indices(params.cache_seqlens.ptr<const int32_t>(), params.block_table.ptr<const int32_t>(),
                       params.block_table.shape[0], params.block_table.shape[1], cache.num_pages());
  cpu::mla_decode(params);  // resolves softmax_scale 0 in double
}

}  // namespace snapmla

// The CUDA cache write, gather and query quantization against the CPU backend:
// every byte of every output must be identical (the formats are defined bit
// for bit by src/core/numeric.h), including the bytes that must NOT change
// (unwritten slots and guard bands around each cache tensor).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/numeric.h"
#include "cpu/reference.h"
#include "cuda/check.h"
#include "cuda/sm90/token_quant.cuh"
#include "snapmla/snapmla.h"

namespace snapmla {
namespace {

using Bytes = std::vector<uint8_t>;

#define SKIP_WITHOUT_HOPPER() \
  if (!hopper_available()) GTEST_SKIP() << "needs a Hopper (sm_90) GPU"

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { SNAPMLA_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1))); }
  explicit DeviceBuffer(const Bytes& host) : DeviceBuffer(host.size()) {
    SNAPMLA_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  uint8_t* get() const { return static_cast<uint8_t*>(ptr_); }
  Bytes download() const {
    Bytes host(bytes_);
    SNAPMLA_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

Bytes random_bytes(size_t n, std::mt19937_64& rng) {
  Bytes b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

template <typename T>
Bytes to_bytes(const std::vector<T>& v) {
  Bytes b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Index vectors (slots, positions, gather indices) in int32 or int64.
Bytes encode_indices(const std::vector<int64_t>& v, DType dtype) {
  if (dtype == DType::kInt64) return to_bytes(v);
  std::vector<int32_t> narrow(v.size());
  for (size_t i = 0; i < v.size(); ++i) narrow[i] = static_cast<int32_t>(v[i]);
  return to_bytes(narrow);
}

// Reports how many bytes differ and where the first difference is, as (row, byte in row).
void expect_same_bytes(const Bytes& got, const Bytes& want, size_t row_bytes, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t mismatches = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      if (mismatches == 0) first = i;
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0u) << what << ": " << mismatches << " of " << got.size()
                            << " bytes differ; first at byte " << first << " (row " << first / row_bytes
                            << ", byte " << first % row_bytes << "): got 0x" << std::hex << int{got[first]}
                            << ", want 0x" << int{want[first]};
}

// ---- paged caches: each tensor sits between two guard bands of random
// bytes, so a write outside the pool shows up as a changed byte. ----
constexpr size_t kGuardBytes = 4096;

struct CachePiece {
  const char* name;
  size_t row_bytes;  // bytes per slot
};

std::vector<CachePiece> cache_pieces(KvFormat format) {
  if (format == KvFormat::kBF16) return {{"data", kHeadDim * 2}};
  return {{"nope", kNopeDim}, {"scale", 4}, {"rope", kRopeDim * 2}};
}

KvCacheView cache_view(KvFormat format, int64_t pages, const std::vector<uint8_t*>& pieces, Device device) {
  if (format == KvFormat::kBF16) return KvCacheView::bf16(pieces[0] + kGuardBytes, pages, device);
  return KvCacheView::fp8(pieces[0] + kGuardBytes, pieces[1] + kGuardBytes, pieces[2] + kGuardBytes, pages, device);
}

// The same cache bytes on the host and on the GPU.
struct MirroredCache {
  KvFormat format;
  int64_t pages;
  std::vector<Bytes> host;
  std::vector<std::unique_ptr<DeviceBuffer>> device;

  MirroredCache(KvFormat f, int64_t num_pages, std::mt19937_64& rng) : format(f), pages(num_pages) {
    for (const CachePiece& p : cache_pieces(f)) {
      host.push_back(random_bytes(2 * kGuardBytes + p.row_bytes * pages * kPageSize, rng));
      device.push_back(std::make_unique<DeviceBuffer>(host.back()));
    }
  }
  // Copies the host bytes to the GPU again (after the host copy was written).
  void upload() {
    for (size_t i = 0; i < host.size(); ++i)
      SNAPMLA_CUDA_CHECK(cudaMemcpy(device[i]->get(), host[i].data(), host[i].size(), cudaMemcpyHostToDevice));
  }
  KvCacheView host_view() {
    std::vector<uint8_t*> p;
    for (auto& b : host) p.push_back(b.data());
    return cache_view(format, pages, p, Device::cpu());
  }
  KvCacheView device_view() {
    std::vector<uint8_t*> p;
    for (auto& b : device) p.push_back(b->get());
    return cache_view(format, pages, p, Device::cuda(0));
  }
  void expect_device_equals_host(const std::string& what) {
    const auto pieces = cache_pieces(format);
    for (size_t i = 0; i < host.size(); ++i)
      expect_same_bytes(device[i]->download(), host[i], pieces[i].row_bytes,
                        what + " cache." + pieces[i].name + " (incl. " + std::to_string(kGuardBytes) +
                            "-byte guard bands)");
  }
};

// ---- tokens with the ranges real caches have ----
struct Rows {
  DType dtype;
  int64_t n = 0, width = 0;
  Bytes bytes;                // [n, width] in dtype
  std::vector<float> values;  // the same values as floats

  float& value(int64_t r, int64_t c) { return values[r * width + c]; }
  void encode() {
    if (dtype == DType::kFloat32) {
      bytes = to_bytes(values);
      return;
    }
    std::vector<uint16_t> bits(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      bits[i] = float_to_bf16_bits(values[i]);
      values[i] = bf16_bits_to_float(bits[i]);
    }
    bytes = to_bytes(bits);
  }
  TensorView view(void* data, Device device) const { return TensorView::contiguous(data, dtype, device, {n, width}); }
};

// Random 576-wide vectors: token magnitudes spread over three decades, some
// tokens x1000 (outliers), some x1e-6 (tiny), one all-zero NoPE part, and a
// few RoPE channels ~100x larger than the rest (SnapMLA's observation).
void fill_tokens(Rows& nope, Rows& rope, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_magnitude(std::log(0.01f), std::log(10.0f));
  const int64_t zero_token = nope.n / 2;
  for (int64_t t = 0; t < nope.n; ++t) {
    float magnitude = std::exp(log_magnitude(rng));
    if (t % 17 == 5) magnitude *= 1000.0f;
    if (t % 23 == 11) magnitude = 1e-6f;
    for (int64_t i = 0; i < nope.width; ++i) nope.value(t, i) = t == zero_token ? 0.0f : normal(rng) * magnitude;
    for (int64_t j = 0; j < rope.width; ++j) rope.value(t, j) = normal(rng) * magnitude * (j % 16 == 3 ? 100.0f : 1.0f);
  }
  nope.encode();
  rope.encode();
}

std::pair<Rows, Rows> make_tokens(int64_t n, DType dtype, std::mt19937_64& rng) {
  Rows nope{dtype, n, kNopeDim, {}, std::vector<float>(n * kNopeDim)};
  Rows rope{dtype, n, kRopeDim, {}, std::vector<float>(n * kRopeDim)};
  fill_tokens(nope, rope, rng);
  return {std::move(nope), std::move(rope)};
}

// [max_pos, 64] f32: cos in [:32], sin in [32:], DeepSeek's theta = 10000.
std::vector<float> make_cos_sin(int64_t max_pos) {
  std::vector<float> table(max_pos * kRopeDim);
  for (int64_t p = 0; p < max_pos; ++p)
    for (int i = 0; i < kRopeDim / 2; ++i) {
      const double angle = static_cast<double>(p) * std::pow(10000.0, -2.0 * i / kRopeDim);
      table[p * kRopeDim + i] = static_cast<float>(std::cos(angle));
      table[p * kRopeDim + kRopeDim / 2 + i] = static_cast<float>(std::sin(angle));
    }
  return table;
}

// A shuffled slot map over a pool ~25% larger than n, with ~10% skipped (-1).
std::vector<int64_t> make_slots(int64_t n, int64_t num_slots, std::mt19937_64& rng) {
  std::vector<int64_t> pool(num_slots);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<int64_t> slots(pool.begin(), pool.begin() + n);
  std::bernoulli_distribution skip(0.1);
  for (auto& s : slots)
    if (skip(rng)) s = -1;
  return slots;
}

int64_t pages_for(int64_t slots) { return (slots + kPageSize - 1) / kPageSize; }

// One write on both backends. `cpu_slots` is `gpu_slots` with -1 wherever
// the GPU must skip a token that the CPU backend would reject instead.
struct WriteJob {
  Rows c_kv, k_pe;
  std::vector<int64_t> gpu_slots, cpu_slots;
  DType index_dtype = DType::kInt32;
  RopeStyle rope = RopeStyle::kNone;
  std::vector<int64_t> positions;
  std::vector<float> cos_sin;
  int64_t max_pos = 0;

  // Runs the CPU reference into cache.host and the kernel into cache.device;
  // returns the kernel's non-finite count.
  int run(MirroredCache& cache) {
    const int64_t n = c_kv.n;
    KvWriteOptions cpu_options;
    Bytes positions_bytes = encode_indices(positions, index_dtype);
    Bytes cos_sin_bytes = to_bytes(cos_sin);
    cpu_options.rope = rope;
    if (rope != RopeStyle::kNone) {
      cpu_options.positions = TensorView::contiguous(positions_bytes.data(), index_dtype, Device::cpu(), {n});
      cpu_options.cos_sin = TensorView::contiguous(cos_sin_bytes.data(), DType::kFloat32, Device::cpu(), {max_pos, kRopeDim});
    }
    Bytes cpu_slot_bytes = encode_indices(cpu_slots, index_dtype);
    write_kv_cache(c_kv.view(c_kv.bytes.data(), Device::cpu()), k_pe.view(k_pe.bytes.data(), Device::cpu()),
                   TensorView::contiguous(cpu_slot_bytes.data(), index_dtype, Device::cpu(), {n}), cache.host_view(),
                   cpu_options);

    const Device gpu = Device::cuda(0);
    DeviceBuffer d_c_kv(c_kv.bytes), d_k_pe(k_pe.bytes), d_slots(encode_indices(gpu_slots, index_dtype));
    DeviceBuffer d_positions(positions_bytes), d_cos_sin(cos_sin_bytes), d_count(Bytes(4, 0));
    KvWriteOptions gpu_options;
    gpu_options.rope = rope;
    if (rope != RopeStyle::kNone) {
      gpu_options.positions = TensorView::contiguous(d_positions.get(), index_dtype, gpu, {n});
      gpu_options.cos_sin = TensorView::contiguous(d_cos_sin.get(), DType::kFloat32, gpu, {max_pos, kRopeDim});
    }
    gpu_options.nonfinite_count = TensorView::contiguous(d_count.get(), DType::kInt32, gpu, {1});
    write_kv_cache(c_kv.view(d_c_kv.get(), gpu), k_pe.view(d_k_pe.get(), gpu),
                   TensorView::contiguous(d_slots.get(), index_dtype, gpu, {n}), cache.device_view(), gpu_options);
    SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
    int32_t count = 0;
    const Bytes count_bytes = d_count.download();
    std::memcpy(&count, count_bytes.data(), sizeof count);
    return count;
  }
};

WriteJob make_write_job(int64_t n, DType input, DType index_dtype, RopeStyle rope, int64_t num_slots,
                        std::mt19937_64& rng) {
  WriteJob job;
  std::tie(job.c_kv, job.k_pe) = make_tokens(n, input, rng);
  job.gpu_slots = make_slots(n, num_slots, rng);
  job.cpu_slots = job.gpu_slots;
  job.index_dtype = index_dtype;
  job.rope = rope;
  job.max_pos = 4096;
  job.cos_sin = make_cos_sin(job.max_pos);
  std::uniform_int_distribution<int64_t> position(0, job.max_pos - 1);
  job.positions.resize(n);
  for (auto& p : job.positions) p = position(rng);
  return job;
}

const char* rope_name(RopeStyle r) {
  return r == RopeStyle::kNone ? "none" : r == RopeStyle::kInterleaved ? "interleaved" : "neox";
}

// ---------------------------------------------------------------------------
using WriteParam = std::tuple<int64_t, KvFormat, RopeStyle, DType>;

class KvWriteTest : public ::testing::TestWithParam<WriteParam> {};

TEST_P(KvWriteTest, MatchesCpuBackendByteForByte) {
  SKIP_WITHOUT_HOPPER();
  const auto [n, format, rope, input] = GetParam();
  std::mt19937_64 rng(1000 + n * 7 + static_cast<int>(format) * 3 + static_cast<int>(rope));
  // Both index widths get covered across the parameter grid.
  const DType index_dtype = (n + static_cast<int>(rope)) % 2 ? DType::kInt64 : DType::kInt32;
  const int64_t num_slots = pages_for(n + n / 4 + 1) * kPageSize;
  WriteJob job = make_write_job(n, input, index_dtype, rope, num_slots, rng);
  MirroredCache cache(format, num_slots / kPageSize, rng);
  EXPECT_EQ(job.run(cache), 0);
  cache.expect_device_equals_host("write");
}

std::string write_name(const ::testing::TestParamInfo<WriteParam>& info) {
  const auto [n, format, rope, input] = info.param;
  return "n" + std::to_string(n) + "_" + kv_format_name(format) + "_rope_" + rope_name(rope) + "_" +
         (input == DType::kFloat32 ? "f32" : "bf16");
}

INSTANTIATE_TEST_SUITE_P(Grid, KvWriteTest,
                         ::testing::Combine(::testing::Values<int64_t>(1, 7, 128, 4097, 100000),
                                            ::testing::Values(KvFormat::kBF16, KvFormat::kFP8),
                                            ::testing::Values(RopeStyle::kNone, RopeStyle::kInterleaved,
                                                              RopeStyle::kNeox),
                                            ::testing::Values(DType::kBFloat16, DType::kFloat32)),
                         write_name);

// Non-finite tokens are counted and not written; -1 tokens are not even
// looked at, so a non-finite token with slot -1 is not counted.
class KvWriteNonFiniteTest : public ::testing::TestWithParam<std::tuple<KvFormat, RopeStyle>> {};

TEST_P(KvWriteNonFiniteTest, SkipsAndCountsNonFiniteTokens) {
  SKIP_WITHOUT_HOPPER();
  const auto [format, rope] = GetParam();
  std::mt19937_64 rng(77 + static_cast<int>(format) * 5 + static_cast<int>(rope));
  const int64_t n = 4097, num_slots = pages_for(n + n / 4) * kPageSize;
  WriteJob job = make_write_job(n, DType::kFloat32, DType::kInt64, rope, num_slots, rng);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  int expected = 0;
  auto poison = [&](int64_t t, bool in_nope, int64_t dim, float value) {
    (in_nope ? job.c_kv.value(t, dim) : job.k_pe.value(t, dim)) = value;
    if (job.gpu_slots[t] != -1) ++expected;
    job.cpu_slots[t] = -1;  // the CPU backend would throw for this token
  };
  for (int64_t t = 3; t < n; t += 97) {
    switch ((t / 97) % 4) {
      case 0: poison(t, true, (t * 13) % kNopeDim, nan); break;
      case 1: poison(t, true, kNopeDim - 1, -inf); break;
      case 2: poison(t, false, (t * 5) % kRopeDim, inf); break;
      default: poison(t, false, 0, -nan); break;
    }
  }
  job.c_kv.bytes = to_bytes(job.c_kv.values);
  job.k_pe.bytes = to_bytes(job.k_pe.values);
  if (rope != RopeStyle::kNone) {
    // An inf in one cos_sin row makes the rotated k_pe of its tokens non-finite.
    const int64_t bad_position = 1234;
    job.cos_sin[bad_position * kRopeDim + kRopeDim / 2 + 5] = inf;
    for (int64_t t = 0; t < n; ++t)
      if (job.positions[t] == bad_position && job.cpu_slots[t] != -1) {
        ++expected;
        job.cpu_slots[t] = -1;
      }
    // Make sure at least one valid token hits the bad row.
    for (int64_t t = 1; t < n; ++t)
      if (job.cpu_slots[t] != -1 && job.positions[t] != bad_position) {
        job.positions[t] = bad_position;
        job.cpu_slots[t] = -1;
        ++expected;
        break;
      }
  }
  ASSERT_GT(expected, 10);
  MirroredCache cache(format, num_slots / kPageSize, rng);
  EXPECT_EQ(job.run(cache), expected);
  cache.expect_device_equals_host("non-finite write");
}

INSTANTIATE_TEST_SUITE_P(Styles, KvWriteNonFiniteTest,
                         ::testing::Combine(::testing::Values(KvFormat::kBF16, KvFormat::kFP8),
                                            ::testing::Values(RopeStyle::kNone, RopeStyle::kNeox)));

// Slots outside the pool (other than -1) and positions outside cos_sin are
// skipped on the GPU: nothing is written anywhere, nothing is counted.
class KvWriteGuardTest : public ::testing::TestWithParam<std::tuple<KvFormat, DType>> {};

TEST_P(KvWriteGuardTest, NeverWritesOutsideThePool) {
  SKIP_WITHOUT_HOPPER();
  const auto [format, index_dtype] = GetParam();
  std::mt19937_64 rng(5 + static_cast<int>(format) + 10 * static_cast<int>(index_dtype));
  const int64_t n = 1000, num_slots = pages_for(n + n / 4) * kPageSize;
  WriteJob job = make_write_job(n, DType::kBFloat16, index_dtype, RopeStyle::kInterleaved, num_slots, rng);
  const int64_t int32_min = std::numeric_limits<int32_t>::min();
  const int64_t bad_slots[] = {num_slots, num_slots + 1, num_slots + 100000, -2, int32_min,
                               index_dtype == DType::kInt64 ? int64_t{1} << 40 : int64_t{2147483647}};
  for (int i = 0; i < 6; ++i) {
    job.gpu_slots[10 * i + 1] = bad_slots[i];
    job.cpu_slots[10 * i + 1] = -1;
  }
  const int64_t bad_positions[] = {-1, job.max_pos, job.max_pos + 7, int32_min};
  for (int i = 0; i < 4; ++i) {
    job.positions[10 * i + 5] = bad_positions[i];
    job.cpu_slots[10 * i + 5] = -1;
  }
  MirroredCache cache(format, num_slots / kPageSize, rng);
  EXPECT_EQ(job.run(cache), 0);
  cache.expect_device_equals_host("guarded write");
}

INSTANTIATE_TEST_SUITE_P(Indices, KvWriteGuardTest,
                         ::testing::Combine(::testing::Values(KvFormat::kBF16, KvFormat::kFP8),
                                            ::testing::Values(DType::kInt32, DType::kInt64)));

// Rows that are slices of a fused [n, 576] projection (16-byte aligned
// stride) and rows at an odd element offset (the kernels' byte-wise path).
class KvWriteLayoutTest : public ::testing::TestWithParam<std::tuple<KvFormat, DType, bool>> {};

TEST_P(KvWriteLayoutTest, StridedAndMisalignedRows) {
  SKIP_WITHOUT_HOPPER();
  const auto [format, input, misaligned] = GetParam();
  std::mt19937_64 rng(31 + static_cast<int>(format) + 2 * static_cast<int>(input) + 4 * misaligned);
  const int64_t n = 777, num_slots = pages_for(n + n / 4) * kPageSize;
  WriteJob job = make_write_job(n, input, DType::kInt32, RopeStyle::kNeox, num_slots, rng);
  // One [n, stride] buffer holding c_kv in [offset, offset+512) and k_pe right after it.
  const size_t elem = dtype_size(input);
  const int64_t offset = misaligned ? 1 : 0, stride = kHeadDim + (misaligned ? 3 : 0);
  Bytes fused = random_bytes((n * stride + offset) * elem, rng);
  for (int64_t t = 0; t < n; ++t) {
    std::memcpy(&fused[((t * stride) + offset) * elem], &job.c_kv.bytes[t * kNopeDim * elem], kNopeDim * elem);
    std::memcpy(&fused[((t * stride) + offset + kNopeDim) * elem], &job.k_pe.bytes[t * kRopeDim * elem], kRopeDim * elem);
  }
  auto strided = [&](uint8_t* base, int64_t first, int64_t width, Device device) {
    TensorView v = TensorView::contiguous(base + (offset + first) * elem, input, device, {n, width});
    v.stride[0] = stride;
    return v;
  };
  MirroredCache cache(format, num_slots / kPageSize, rng);
  Bytes slots = encode_indices(job.gpu_slots, DType::kInt32);
  Bytes positions = encode_indices(job.positions, DType::kInt32);
  Bytes cos_sin = to_bytes(job.cos_sin);
  KvWriteOptions options;
  options.rope = RopeStyle::kNeox;
  options.positions = TensorView::contiguous(positions.data(), DType::kInt32, Device::cpu(), {n});
  options.cos_sin = TensorView::contiguous(cos_sin.data(), DType::kFloat32, Device::cpu(), {job.max_pos, kRopeDim});
  write_kv_cache(strided(fused.data(), 0, kNopeDim, Device::cpu()), strided(fused.data(), kNopeDim, kRopeDim, Device::cpu()),
                 TensorView::contiguous(slots.data(), DType::kInt32, Device::cpu(), {n}), cache.host_view(), options);

  const Device gpu = Device::cuda(0);
  DeviceBuffer d_fused(fused), d_slots(slots), d_positions(positions), d_cos_sin(cos_sin);
  options.positions = TensorView::contiguous(d_positions.get(), DType::kInt32, gpu, {n});
  options.cos_sin = TensorView::contiguous(d_cos_sin.get(), DType::kFloat32, gpu, {job.max_pos, kRopeDim});
  write_kv_cache(strided(d_fused.get(), 0, kNopeDim, gpu), strided(d_fused.get(), kNopeDim, kRopeDim, gpu),
                 TensorView::contiguous(d_slots.get(), DType::kInt32, gpu, {n}), cache.device_view(), options);
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  cache.expect_device_equals_host(misaligned ? "misaligned-rows write" : "fused-rows write");
}

INSTANTIATE_TEST_SUITE_P(Layouts, KvWriteLayoutTest,
                         ::testing::Combine(::testing::Values(KvFormat::kBF16, KvFormat::kFP8),
                                            ::testing::Values(DType::kBFloat16, DType::kFloat32),
                                            ::testing::Bool()));

// ---------------------------------------------------------------------------
// Gather: a cache fully written (by the CPU backend) with random tokens, read
// back at shuffled, repeated indices; ~5% of the indices are outside the pool
// and must produce rows of zeros on the GPU.
using GatherParam = std::tuple<int64_t, KvFormat, DType>;
class KvGatherTest : public ::testing::TestWithParam<GatherParam> {};

std::vector<double> bf16_bits_to_doubles(const Bytes& bytes) {
  std::vector<double> out(bytes.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t b;
    std::memcpy(&b, &bytes[2 * i], 2);
    out[i] = bf16_bits_to_float(b);
  }
  return out;
}

TEST_P(KvGatherTest, MatchesCpuBackendAndDequantizes) {
  SKIP_WITHOUT_HOPPER();
  const auto [n, format, index_dtype] = GetParam();
  std::mt19937_64 rng(4242 + n + static_cast<int>(format));
  const int64_t pages = std::max<int64_t>(2, n / (2 * kPageSize) + 2);
  const int64_t num_slots = pages * kPageSize;

  // Fill every slot through the CPU backend, then mirror the bytes to the GPU.
  MirroredCache cache(format, pages, rng);
  auto [c_kv, k_pe] = make_tokens(num_slots, DType::kFloat32, rng);
  std::vector<int64_t> all_slots(num_slots);
  std::iota(all_slots.begin(), all_slots.end(), 0);
  Bytes all_slot_bytes = encode_indices(all_slots, DType::kInt64);
  write_kv_cache(c_kv.view(c_kv.bytes.data(), Device::cpu()), k_pe.view(k_pe.bytes.data(), Device::cpu()),
                 TensorView::contiguous(all_slot_bytes.data(), DType::kInt64, Device::cpu(), {num_slots}),
                 cache.host_view());
  cache.upload();

  std::uniform_int_distribution<int64_t> slot(0, num_slots - 1);
  std::bernoulli_distribution out_of_range(0.05);
  const int64_t bad[] = {-1, num_slots, num_slots + 12345, std::numeric_limits<int32_t>::min()};
  std::vector<int64_t> gpu_indices(n), cpu_indices(n);
  std::vector<bool> zero_row(n, false);
  for (int64_t i = 0; i < n; ++i) {
    gpu_indices[i] = cpu_indices[i] = slot(rng);
    if (n > 1 && out_of_range(rng)) {
      gpu_indices[i] = bad[i % 4];
      zero_row[i] = true;
    }
  }

  Bytes cpu_indices_bytes = encode_indices(cpu_indices, index_dtype);
  Bytes want_nope(n * kNopeDim * 2), want_rope(n * kRopeDim * 2);
  gather_kv_cache(cache.host_view(), TensorView::contiguous(cpu_indices_bytes.data(), index_dtype, Device::cpu(), {n}),
                  TensorView::contiguous(want_nope.data(), DType::kBFloat16, Device::cpu(), {n, kNopeDim}),
                  TensorView::contiguous(want_rope.data(), DType::kBFloat16, Device::cpu(), {n, kRopeDim}));
  for (int64_t i = 0; i < n; ++i)
    if (zero_row[i]) {
      std::fill_n(&want_nope[i * kNopeDim * 2], kNopeDim * 2, 0);
      std::fill_n(&want_rope[i * kRopeDim * 2], kRopeDim * 2, 0);
    }

  const Device gpu = Device::cuda(0);
  DeviceBuffer d_indices(encode_indices(gpu_indices, index_dtype));
  DeviceBuffer d_nope(Bytes(want_nope.size(), 0xff)), d_rope(Bytes(want_rope.size(), 0xff));  // poison: NaN bf16
  gather_kv_cache(cache.device_view(), TensorView::contiguous(d_indices.get(), index_dtype, gpu, {n}),
                  TensorView::contiguous(d_nope.get(), DType::kBFloat16, gpu, {n, kNopeDim}),
                  TensorView::contiguous(d_rope.get(), DType::kBFloat16, gpu, {n, kRopeDim}));
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  const Bytes got_nope = d_nope.download(), got_rope = d_rope.download();
  expect_same_bytes(got_nope, want_nope, kNopeDim * 2, "gather k_nope");
  expect_same_bytes(got_rope, want_rope, kRopeDim * 2, "gather k_pe");

  // Independent of the CPU backend: the gathered rows are the written tokens
  // up to the format's rounding. fp8 NoPE: e4m3 keeps 3 mantissa bits, so
  // each value is within 2^-4 relative (RMS ~2^-4/sqrt(3) ~ 0.036 at worst,
  // ~0.02-0.03 on Gaussian rows) plus one bf16 rounding (2^-9): rel-L2 < 0.05
  // and cosine > 0.998. RoPE and the bf16 cache: at most two bf16 roundings
  // (2^-9 each): rel-L2 < 0.005.
  std::vector<double> nope_ref, rope_ref, nope_got, rope_got;
  const std::vector<double> nope_all = bf16_bits_to_doubles(got_nope), rope_all = bf16_bits_to_doubles(got_rope);
  for (int64_t i = 0; i < n; ++i) {
    if (zero_row[i]) continue;
    const int64_t s = gpu_indices[i];
    for (int d = 0; d < kNopeDim; ++d) {
      nope_ref.push_back(c_kv.value(s, d));
      nope_got.push_back(nope_all[i * kNopeDim + d]);
    }
    for (int d = 0; d < kRopeDim; ++d) {
      rope_ref.push_back(k_pe.value(s, d));
      rope_got.push_back(rope_all[i * kRopeDim + d]);
    }
  }
  const auto nope_err = reference::compare(nope_got, nope_ref);
  const auto rope_err = reference::compare(rope_got, rope_ref);
  EXPECT_EQ(nope_err.nonfinite, 0);
  EXPECT_EQ(rope_err.nonfinite, 0);
  EXPECT_LT(nope_err.rel_l2, format == KvFormat::kFP8 ? 0.05 : 0.005);
  EXPECT_GT(nope_err.cosine, format == KvFormat::kFP8 ? 0.998 : 0.99999);
  EXPECT_LT(rope_err.rel_l2, 0.005);
}

std::string gather_name(const ::testing::TestParamInfo<GatherParam>& info) {
  const auto [n, format, index_dtype] = info.param;
  return "n" + std::to_string(n) + "_" + kv_format_name(format) + "_" +
         (index_dtype == DType::kInt64 ? "int64" : "int32");
}

INSTANTIATE_TEST_SUITE_P(Grid, KvGatherTest,
                         ::testing::Combine(::testing::Values<int64_t>(1, 7, 128, 4097, 100000),
                                            ::testing::Values(KvFormat::kBF16, KvFormat::kFP8),
                                            ::testing::Values(DType::kInt32, DType::kInt64)),
                         gather_name);

// ---------------------------------------------------------------------------
// Query quantization: rows with the same magnitude mix as the cache tokens.
using QueryParam = std::tuple<int, int, int>;  // batch, s_q, h_q
class QuantizeQueryTest : public ::testing::TestWithParam<QueryParam> {};

TEST_P(QuantizeQueryTest, MatchesCpuBackendByteForByte) {
  SKIP_WITHOUT_HOPPER();
  const auto [batch, s_q, h_q] = GetParam();
  std::mt19937_64 rng(99 + batch * 1000 + s_q * 100 + h_q);
  const int64_t rows = int64_t{batch} * s_q * h_q;
  auto [nope, rope] = make_tokens(rows, DType::kBFloat16, rng);
  std::vector<uint16_t> q(rows * kHeadDim);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(&q[r * kHeadDim], &nope.bytes[r * kNopeDim * 2], kNopeDim * 2);
    std::memcpy(&q[r * kHeadDim + kNopeDim], &rope.bytes[r * kRopeDim * 2], kRopeDim * 2);
  }
  Bytes q_bytes = to_bytes(q);
  Bytes want_nope(rows * kNopeDim, 0xa5), want_scale(rows * 4, 0xa5), want_rope(rows * kRopeDim * 2, 0xa5);
  auto views = [&](uint8_t* qd, uint8_t* n8, uint8_t* sc, uint8_t* ro, Device d) {
    return std::make_tuple(TensorView::contiguous(qd, DType::kBFloat16, d, {batch, s_q, h_q, kHeadDim}),
                           TensorView::contiguous(n8, DType::kFloat8E4M3, d, {batch, s_q, h_q, kNopeDim}),
                           TensorView::contiguous(sc, DType::kFloat32, d, {batch, s_q, h_q}),
                           TensorView::contiguous(ro, DType::kBFloat16, d, {batch, s_q, h_q, kRopeDim}));
  };
  {
    auto [tq, tn, ts, tr] = views(q_bytes.data(), want_nope.data(), want_scale.data(), want_rope.data(), Device::cpu());
    quantize_query(tq, tn, ts, tr);
  }
  // Poison with a different pattern than the CPU outputs started from.
  DeviceBuffer d_q(q_bytes), d_nope(Bytes(want_nope.size(), 0x5a)), d_scale(Bytes(want_scale.size(), 0x5a)),
      d_rope(Bytes(want_rope.size(), 0x5a));
  {
    auto [tq, tn, ts, tr] = views(d_q.get(), d_nope.get(), d_scale.get(), d_rope.get(), Device::cuda(0));
    quantize_query(tq, tn, ts, tr);
  }
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  expect_same_bytes(d_nope.download(), want_nope, kNopeDim, "q_nope");
  expect_same_bytes(d_scale.download(), want_scale, 4, "q_scale");
  expect_same_bytes(d_rope.download(), want_rope, kRopeDim * 2, "q_rope");
}

std::string query_name(const ::testing::TestParamInfo<QueryParam>& info) {
  const auto [b, s, h] = info.param;
  return "b" + std::to_string(b) + "_sq" + std::to_string(s) + "_h" + std::to_string(h);
}

INSTANTIATE_TEST_SUITE_P(Shapes, QuantizeQueryTest,
                         ::testing::Values(QueryParam{1, 1, 1}, QueryParam{2, 1, 16}, QueryParam{3, 2, 128},
                                           QueryParam{64, 4, 128}),
                         query_name);

// ---------------------------------------------------------------------------
// The hardware converters the kernels use against the software definitions
// in src/core/numeric.h.
__global__ void convert_kernel(const float* in, int64_t pairs, uint16_t* e4m3_pairs, uint32_t* bf16_pairs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  e4m3_pairs[i] = static_cast<uint16_t>(cuda::token_quant::e4m3x2_bits(in[2 * i], in[2 * i + 1]));
  bf16_pairs[i] = cuda::token_quant::bf16x2_bits(in[2 * i], in[2 * i + 1]);
}

__global__ void e4m3_decode_kernel(float* out) {
  const int code = threadIdx.x;  // 256 threads: pairs (code, code ^ 0x80)
  const float2 v = cuda::token_quant::e4m3x2_to_float2(static_cast<uint32_t>(code) | ((code ^ 0x80u) << 8));
  out[2 * code] = v.x;
  out[2 * code + 1] = v.y;
}

std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%x", v);
  return buf;
}

std::vector<float> conversion_inputs() {
  std::vector<float> in;
  // Every bf16 bit pattern: all exponents, both signs, f32 subnormals, inf, NaN.
  for (uint32_t hi = 0; hi < 65536; ++hi) in.push_back(bits_float(hi << 16));
  // bf16 ties and their neighbours (low half exactly 0x8000, +-1 ulp).
  for (uint32_t hi = 0; hi < 65536; ++hi)
    for (uint32_t lo : {0x7fffu, 0x8000u, 0x8001u}) in.push_back(bits_float((hi << 16) | lo));
  // e4m3 midpoints (ties, incl. the subnormal ones and 464 = 448|480 which
  // saturates) and the floats either side of them.
  for (int code = 0; code < 0x7e; ++code) {
    const float a = e4m3_bits_to_float(static_cast<uint8_t>(code));
    const float b = e4m3_bits_to_float(static_cast<uint8_t>(code + 1));
    const float mid = 0.5f * (a + b);  // exact: both have few mantissa bits
    for (float v : {a, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      in.push_back(v);
      in.push_back(-v);
    }
  }
  // Saturation: 464 is the tie between 448 and the (absent) 480.
  for (float v : {448.0f, 464.0f, std::nextafter(464.0f, 0.0f), std::nextafter(464.0f, 1e9f), 480.0f, 1e30f,
                  std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity()}) {
    in.push_back(v);
    in.push_back(-v);
  }
  // Random floats over the exponents that matter for e4m3 and beyond, and random f32 subnormals.
  std::mt19937_64 rng(12345);
  std::uniform_int_distribution<uint32_t> exponent(127 - 30, 127 + 20), mantissa(0, (1u << 23) - 1), sign(0, 1);
  for (int i = 0; i < 4000000; ++i) in.push_back(bits_float((sign(rng) << 31) | (exponent(rng) << 23) | mantissa(rng)));
  for (int i = 0; i < 200000; ++i) in.push_back(bits_float((sign(rng) << 31) | mantissa(rng)));
  if (in.size() % 2) in.push_back(1.0f);
  return in;
}

TEST(HardwareConversion, E4M3AndBF16MatchTheSoftwareDefinitions) {
  SKIP_WITHOUT_HOPPER();
  const std::vector<float> in = conversion_inputs();
  const int64_t pairs = static_cast<int64_t>(in.size() / 2);
  DeviceBuffer d_in(to_bytes(in)), d_e4m3(pairs * 2), d_bf16(pairs * 4);
  convert_kernel<<<static_cast<unsigned>((pairs + 255) / 256), 256>>>(
      reinterpret_cast<const float*>(d_in.get()), pairs, reinterpret_cast<uint16_t*>(d_e4m3.get()),
      reinterpret_cast<uint32_t*>(d_bf16.get()));
  SNAPMLA_CUDA_CHECK_LAUNCH();
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  const Bytes e4m3 = d_e4m3.download(), bf16 = d_bf16.download();

  int64_t e4m3_mismatch = 0, bf16_mismatch = 0, nan_inputs = 0;
  std::string first_e4m3, first_bf16;
  for (size_t i = 0; i < in.size(); ++i) {
    const uint8_t hw8 = e4m3[i];  // pair element order: low byte = first float
    uint16_t hw16;
    std::memcpy(&hw16, &bf16[2 * i], 2);
    if (std::isnan(in[i])) {
      // NaN is never converted by the kernels (non-finite tokens are skipped);
      // only require that it stays NaN.
      ++nan_inputs;
      EXPECT_EQ(hw8 & 0x7f, 0x7f) << "e4m3 of NaN";
      EXPECT_TRUE(std::isnan(bf16_bits_to_float(hw16))) << "bf16 of NaN";
      continue;
    }
    if (hw8 != float_to_e4m3_bits(in[i]) && e4m3_mismatch++ == 0)
      first_e4m3 = "input " + hex(float_bits(in[i])) + ": hw " + hex(hw8) + ", sw " + hex(float_to_e4m3_bits(in[i]));
    if (hw16 != float_to_bf16_bits(in[i]) && bf16_mismatch++ == 0)
      first_bf16 = "input " + hex(float_bits(in[i])) + ": hw " + hex(hw16) + ", sw " + hex(float_to_bf16_bits(in[i]));
  }
  EXPECT_GT(nan_inputs, 0);
  EXPECT_EQ(e4m3_mismatch, 0) << "of " << in.size() << " inputs; first: " << first_e4m3;
  EXPECT_EQ(bf16_mismatch, 0) << "of " << in.size() << " inputs; first: " << first_bf16;

  // The decode direction (used by the gather): all 256 codes.
  DeviceBuffer d_decoded(512 * sizeof(float));
  e4m3_decode_kernel<<<1, 256>>>(reinterpret_cast<float*>(d_decoded.get()));
  SNAPMLA_CUDA_CHECK_LAUNCH();
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  const Bytes decoded_bytes = d_decoded.download();
  std::vector<float> decoded(512);
  std::memcpy(decoded.data(), decoded_bytes.data(), decoded_bytes.size());
  for (int code = 0; code < 256; ++code) {
    const float want[2] = {e4m3_bits_to_float(static_cast<uint8_t>(code)),
                           e4m3_bits_to_float(static_cast<uint8_t>(code ^ 0x80))};
    for (int k = 0; k < 2; ++k) {
      const float got = decoded[2 * code + k];
      if (std::isnan(want[k]))
        EXPECT_TRUE(std::isnan(got)) << "code " << code;
      else
        EXPECT_EQ(float_bits(got), float_bits(want[k])) << "code " << (k ? code ^ 0x80 : code);
    }
  }
}

// A decode step's cache write (n = 1..128 tokens) must be one kernel launch
// with no host synchronisation and no allocation: captured in global mode,
// either would make the capture fail; the graph must hold exactly one kernel,
// and replaying it must write what the CPU reference writes.
TEST(KvWriteGraph, DecodeStepIsOneLaunchWithoutSyncOrAllocation) {
  SKIP_WITHOUT_HOPPER();
  std::mt19937_64 rng(2027);
  for (KvFormat format : {KvFormat::kBF16, KvFormat::kFP8}) {
    for (int64_t n : {1, 128}) {
      SCOPED_TRACE(std::string(kv_format_name(format)) + " n=" + std::to_string(n));
      MirroredCache cache(format, 4, rng);
      auto [c_kv, k_pe] = make_tokens(n, DType::kBFloat16, rng);
      const std::vector<int64_t> slots = make_slots(n, 4 * kPageSize, rng);
      const Device gpu = Device::cuda(0);
      DeviceBuffer d_c_kv(c_kv.bytes), d_k_pe(k_pe.bytes), d_slots(encode_indices(slots, DType::kInt32)),
          d_count(Bytes(4, 0));
      KvWriteOptions options;
      options.nonfinite_count = TensorView::contiguous(d_count.get(), DType::kInt32, gpu, {1});

      cudaStream_t stream;
      SNAPMLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      cudaGraph_t graph;
      SNAPMLA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      write_kv_cache(c_kv.view(d_c_kv.get(), gpu), k_pe.view(d_k_pe.get(), gpu),
                     TensorView::contiguous(d_slots.get(), DType::kInt32, gpu, {n}), cache.device_view(), options,
                     stream);
      SNAPMLA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      size_t nodes = 0;
      SNAPMLA_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
      EXPECT_EQ(nodes, 1u);
      std::vector<cudaGraphNode_t> node_list(nodes);
      SNAPMLA_CUDA_CHECK(cudaGraphGetNodes(graph, node_list.data(), &nodes));
      for (cudaGraphNode_t node : node_list) {
        cudaGraphNodeType type;
        SNAPMLA_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
        EXPECT_EQ(type, cudaGraphNodeTypeKernel);
      }
      cudaGraphExec_t exec;
      SNAPMLA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      SNAPMLA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      SNAPMLA_CUDA_CHECK(cudaStreamSynchronize(stream));

      Bytes cpu_slots = encode_indices(slots, DType::kInt32);
      write_kv_cache(c_kv.view(c_kv.bytes.data(), Device::cpu()), k_pe.view(k_pe.bytes.data(), Device::cpu()),
                     TensorView::contiguous(cpu_slots.data(), DType::kInt32, Device::cpu(), {n}), cache.host_view());
      cache.expect_device_equals_host("graph replay");
      SNAPMLA_CUDA_CHECK(cudaGraphExecDestroy(exec));
      SNAPMLA_CUDA_CHECK(cudaGraphDestroy(graph));
      SNAPMLA_CUDA_CHECK(cudaStreamDestroy(stream));
    }
  }
}

}  // namespace
}  // namespace snapmla

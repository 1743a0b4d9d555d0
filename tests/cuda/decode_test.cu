// The sm90 MLA decode against the float64 oracle (src/cpu/reference.h):
//   (a) reference::decode_paged on the same cache (dequantized), which
//       isolates the kernel's own arithmetic; for fp8 also with the oracle's
//       emulation of the query and P roundings, which must then agree tightly;
//   (b) reference::decode_dense on the unquantized inputs: what a user sees.
// Outputs are poisoned with NaN before every run and every element is
// checked, so an unwritten row fails. Caches start as NaN (tests/cpu/host_cache.h),
// so reading an unwritten slot or a page past a sequence's end fails too.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/numeric.h"
#include "core/schedule.h"
#include "core/synthetic.h"
#include "cpu/host_cache.h"
#include "cpu/reference.h"
#include "cuda/check.h"
#include "cuda/sm90/decode_launch.cuh"
#include "cuda/sm90/decode_params.cuh"
#include "snapmla/snapmla.h"

namespace snapmla {
namespace {

using synthetic::Distribution;

#define SKIP_WITHOUT_HOPPER() \
  if (!hopper_available()) GTEST_SKIP() << "needs a Hopper (sm_90) GPU"

const Device kGpu = Device::cuda(0);
const double kSoftmaxScale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    SNAPMLA_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)));
  }
  template <typename T>
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size() * sizeof(T)) {
    SNAPMLA_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  void fill(uint8_t byte) const { SNAPMLA_CUDA_CHECK(cudaMemset(ptr_, byte, bytes_)); }
  template <typename T>
  std::vector<T> download() const {
    std::vector<T> host(bytes_ / sizeof(T));
    SNAPMLA_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, host.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// One decode problem on the GPU: the cache, indices, query, schedule and
// outputs, with the host copies the references need.
struct GpuDecode {
  synthetic::Workload workload;
  KvFormat format;
  testing::HostCache host_cache;
  std::vector<uint16_t> q_bf16;
  int batch, s_q, h_q, rows, num_parts;

  DeviceBuffer q, block_table, seqlens;
  DeviceBuffer cache_data, cache_nope, cache_scale, cache_rope;
  DeviceBuffer metadata, num_splits, workspace, out, lse;

  // num_parts 0: the library's choice for this GPU.
  GpuDecode(const synthetic::WorkloadSpec& spec, KvFormat fmt, int parts = 0)
      : workload(synthetic::make_workload(spec)),
        format(fmt),
        host_cache(testing::cache_from_workload(workload, fmt)),
        q_bf16(testing::to_bf16(workload.q)),
        batch(spec.batch),
        s_q(spec.s_q),
        h_q(spec.h_q),
        rows(spec.s_q * spec.h_q),
        num_parts(parts > 0 ? parts : decode_num_sm_parts(kGpu, spec.s_q * spec.h_q)),
        q(q_bf16),
        block_table(workload.block_table),
        seqlens(workload.spec.seqlens),
        cache_data(host_cache.data),
        cache_nope(host_cache.nope),
        cache_scale(host_cache.scale),
        cache_rope(host_cache.rope),
        metadata(static_cast<size_t>(num_parts) * kScheduleMetadataFields * sizeof(int32_t)),
        num_splits((static_cast<size_t>(batch) + 1) * sizeof(int32_t)),
        workspace(decode_workspace_bytes(batch, s_q, h_q, num_parts)),
        out(static_cast<size_t>(batch) * rows * kHeadDimV * sizeof(uint16_t)),
        lse(static_cast<size_t>(batch) * rows * sizeof(float)) {
    get_mla_metadata(seqlens_view(), rows, schedule());
    SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  }


  TensorView seqlens_view() const {
    return TensorView::contiguous(seqlens.get(), DType::kInt32, kGpu, {batch});
  }
  DecodeSchedule schedule() const {
    return {TensorView::contiguous(metadata.get(), DType::kInt32, kGpu, {num_parts, kScheduleMetadataFields}),
            TensorView::contiguous(num_splits.get(), DType::kInt32, kGpu, {batch + 1})};
  }
  KvCacheView cache_view() const {
    const int64_t pages = host_cache.num_pages;
    if (format == KvFormat::kBF16) return KvCacheView::bf16(cache_data.get(), pages, kGpu);
    return KvCacheView::fp8(cache_nope.get(), cache_scale.get(), cache_rope.get(), pages, kGpu);
  }
  DecodeParams params() const {
    DecodeParams p;
    p.q = TensorView::contiguous(q.get(), DType::kBFloat16, kGpu, {batch, s_q, h_q, kHeadDim});
    p.cache = cache_view();
    p.block_table =
        TensorView::contiguous(block_table.get(), DType::kInt32, kGpu, {batch, workload.max_pages});
    p.cache_seqlens = seqlens_view();
    p.softmax_scale = 0.0f;  // 1/sqrt(576), as the references use
    p.causal = true;
    p.out = TensorView::contiguous(out.get(), DType::kBFloat16, kGpu, {batch, s_q, h_q, kHeadDimV});
    p.lse = TensorView::contiguous(lse.get(), DType::kFloat32, kGpu, {batch, h_q, s_q});
    p.schedule = schedule();
    p.workspace = TensorView::contiguous(workspace.get(), DType::kUInt8, kGpu,
                                         {static_cast<int64_t>(workspace.bytes())});
    return p;
  }

  // Poisons the outputs (all-ones bytes: NaN in bf16 and f32), runs, and
  // returns out (as doubles) and lse.
  reference::DecodeResult run(const DecodeParams& p) const {
    out.fill(0xff);
    lse.fill(0xff);
    mla_decode(p);
    SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
    reference::DecodeResult r;
    for (uint16_t bits : out.download<uint16_t>()) r.out.push_back(bf16_bits_to_float(bits));
    for (float x : lse.download<float>()) r.lse.push_back(x);
    return r;
  }
  reference::DecodeResult run() const { return run(params()); }

  // Raw output bytes, for bitwise comparisons.
  std::vector<uint16_t> out_bits() const { return out.download<uint16_t>(); }
  std::vector<uint32_t> lse_bits() const { return lse.download<uint32_t>(); }

  reference::DecodeResult reference_paged(reference::Fp8Emulation emulation = {}) {
    const Device cpu = Device::cpu();
    return reference::decode_paged(
        TensorView::contiguous(workload.q.data(), DType::kFloat32, cpu, {batch, s_q, h_q, kHeadDim}),
        host_cache.view(),
        TensorView::contiguous(workload.block_table.data(), DType::kInt32, cpu, {batch, workload.max_pages}),
        TensorView::contiguous(workload.spec.seqlens.data(), DType::kInt32, cpu, {batch}), kSoftmaxScale, true,
        emulation);
  }
  reference::DecodeResult reference_dense() const {
    std::vector<double> qd(workload.q.begin(), workload.q.end());
    std::vector<std::vector<double>> keys;
    for (int b = 0; b < batch; ++b) keys.push_back(synthetic::sequence_keys(workload, b));
    return reference::decode_dense(qd, batch, s_q, h_q, keys, kSoftmaxScale, true);
  }
};

synthetic::WorkloadSpec make_spec(int batch, int s_q, int h_q, std::vector<int32_t> seqlens, Distribution d,
                                  uint64_t seed) {
  synthetic::WorkloadSpec spec;
  spec.batch = batch;
  spec.s_q = s_q;
  spec.h_q = h_q;
  spec.seqlens = std::move(seqlens);
  spec.distribution = d;
  spec.seed = seed;
  spec.extra_pages = 3;  // pages no sequence owns: still NaN, never read
  return spec;
}

// Every output element was written: out finite everywhere, lse finite exactly
// where the reference's is (-inf only for rows that see no token).
void expect_all_written(const reference::DecodeResult& got, const reference::DecodeResult& ref) {
  int64_t bad_out = 0;
  for (double x : got.out) bad_out += !std::isfinite(x);
  EXPECT_EQ(bad_out, 0) << "non-finite (unwritten or NaN) output elements";
  const reference::ErrorStats lse = reference::compare_lse(got.lse, ref.lse);
  EXPECT_EQ(lse.nonfinite, 0) << "lse entries whose finiteness differs from the reference";
  int64_t nan_lse = 0;
  for (double x : got.lse) nan_lse += std::isnan(x);
  EXPECT_EQ(nan_lse, 0) << "NaN lse entries";
}

// max |got - ref| / (1 + |ref|) over rows the reference sees: scores (and
// so lse) are large for the outlier distributions, where an fp32 error is
// relative to their size.
double lse_scaled_error(const std::vector<double>& got, const std::vector<double>& ref) {
  double worst = 0.0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i)
    if (std::isfinite(ref[i])) worst = std::max(worst, std::fabs(got[i] - ref[i]) / (1.0 + std::fabs(ref[i])));
  return worst;
}

struct Errors {
  reference::ErrorStats out_a, out_emulated, out_b;
  reference::ErrorStats lse_a, lse_emulated, lse_b;
};

// The kernel mla_decode runs (the same choice for both cache formats).
const char* kernel_name() { return cuda::sm90::decode_kernel_name(cuda::sm90::decode_kernel_choice()); }

// Runs one case and compares it with all references; prints one CASE line.
Errors check_case(const synthetic::WorkloadSpec& spec, KvFormat format) {
  GpuDecode decode(spec, format);
  const reference::DecodeResult got = decode.run();
  const reference::DecodeResult paged = decode.reference_paged();
  const reference::DecodeResult dense = decode.reference_dense();
  expect_all_written(got, paged);
  Errors e;
  e.out_a = reference::compare(got.out, paged.out);
  e.lse_a = reference::compare_lse(got.lse, paged.lse);
  e.out_b = reference::compare(got.out, dense.out);
  e.lse_b = reference::compare_lse(got.lse, dense.lse);
  if (format == KvFormat::kFP8) {
    const reference::DecodeResult emulated = decode.reference_paged({.quantize_query = true, .quantize_p = true});
    e.out_emulated = reference::compare(got.out, emulated.out);
    e.lse_emulated = reference::compare_lse(got.lse, emulated.lse);
    e.lse_emulated.max_abs = lse_scaled_error(got.lse, emulated.lse);
  }
  std::printf(
      "CASE fmt=%s kernel=%s dist=%s b=%d s_q=%d h_q=%d parts=%d relerr_a=%.3e relerr_emul=%.3e relerr_b=%.3e "
      "cos=%.6f lse_err_a=%.3e lse_err_emul=%.3e lse_err_b=%.3e\n",
      kv_format_name(format), kernel_name(), synthetic::distribution_name(spec.distribution), spec.batch,
      spec.s_q, spec.h_q, decode.num_parts, e.out_a.rel_l2, e.out_emulated.rel_l2, e.out_b.rel_l2, e.out_b.cosine,
      e.lse_a.max_abs, e.lse_emulated.max_abs, e.lse_b.max_abs);
  return e;
}

// ---- tolerances ----
// bf16 cache: the kernel reads exactly the reference's values; its errors are
// the bf16 rounding of P (2^-9 relative per weight, averaging out over tokens)
// and of the output (2^-9), so ~1e-3 rms. FlashMLA's bf16 kernel measures
// 2e-3 on the same data; 3e-3 is the acceptance bound.
constexpr double kBf16MaxRelL2 = 3e-3;
// lse is computed from fp32 scores of exact bf16 products: ~1e-6 relative.
constexpr double kBf16MaxLseErr = 1e-3;
// fp8 against the oracle that emulates its query and P roundings: what is left
// is fp32 vs f64 arithmetic, the bf16 output rounding (~1e-3) and rare e4m3
// rounding flips where float and double land on different sides of a tie.
constexpr double kFp8MaxRelL2Emulated = 6e-3;
// lse, as |error| / (1 + |lse|): the fp8 MMA accumulates each 128-dim chunk
// with fewer than fp32's bits (~2^-13 relative to the chunk's terms).
constexpr double kFp8MaxLseErrEmulated = 2e-3;
// fp8 against the same cache without emulation: adds the e4m3 P (3 mantissa
// bits: ~0.026 rms relative per weight, which for near-uniform attention
// passes straight into the output) and the e4m3 query (averaged over 512
// dims in each score): ~0.027 expected.
constexpr double kFp8MaxRelL2Paged = 0.035;
// fp8 against the unquantized inputs on FlashMLA's data (randn/10): the e4m3
// rounding of V (FlashMLA's fp8 cache alone: 0.027) and of P (~0.026, see
// above) add in quadrature to ~0.037 expected; SnapMLA's port is bounded by
// rel-L2 5e-2, cosine distance 1e-3, |dLSE| 2e-2. 0.04 is the acceptance
// bound, asserted at serving shapes (thousands of tokens per row). The small
// shapes below (45..1000 tokens per row) average fewer rounding errors, so
// their measured error spreads more from seed to seed (0.035..0.041 on an
// H100, 2026-11-23): they get 0.045.
constexpr double kFp8MaxRelL2Dense = 0.04;
constexpr double kFp8MaxRelL2DenseFewTokens = 0.045;
constexpr double kFp8MinCosineDense = 0.999;
constexpr double kFp8MaxLseErrDense = 0.02;
// Other distributions are built to stress fp8 (outliers, heavy tails): they
// are reported, and bounded only loosely against gross failure.
constexpr double kFp8MaxRelL2DenseStress = 0.15;
constexpr double kFp8MinCosineDenseStress = 0.99;

void expect_bf16_case(const Errors& e) {
  EXPECT_LE(e.out_a.rel_l2, kBf16MaxRelL2);
  EXPECT_LE(e.out_b.rel_l2, kBf16MaxRelL2);  // the bf16 cache holds the inputs exactly
  EXPECT_LE(e.lse_a.max_abs, kBf16MaxLseErr);
  EXPECT_EQ(e.out_a.nonfinite, 0);
}

void expect_fp8_case(const Errors& e, Distribution d, double max_rel_l2_dense) {
  EXPECT_EQ(e.out_a.nonfinite, 0);
  EXPECT_LE(e.out_emulated.rel_l2, kFp8MaxRelL2Emulated);
  EXPECT_LE(e.lse_emulated.max_abs, kFp8MaxLseErrEmulated);
  if (d == Distribution::kGaussian) {
    EXPECT_LE(e.out_a.rel_l2, kFp8MaxRelL2Paged);
    EXPECT_LE(e.out_b.rel_l2, max_rel_l2_dense);
    EXPECT_GE(e.out_b.cosine, kFp8MinCosineDense);
    EXPECT_LE(e.lse_b.max_abs, kFp8MaxLseErrDense);
  } else {
    EXPECT_LE(e.out_b.rel_l2, kFp8MaxRelL2DenseStress);
    EXPECT_GE(e.out_b.cosine, kFp8MinCosineDenseStress);
  }
}

void expect_case(const synthetic::WorkloadSpec& spec, KvFormat format,
                 double fp8_max_rel_l2_dense = kFp8MaxRelL2DenseFewTokens) {
  SCOPED_TRACE(std::string(kv_format_name(format)) + " " + synthetic::distribution_name(spec.distribution) +
               " b=" + std::to_string(spec.batch) + " s_q=" + std::to_string(spec.s_q) +
               " h_q=" + std::to_string(spec.h_q));
  const Errors e = check_case(spec, format);
  if (format == KvFormat::kBF16) {
    expect_bf16_case(e);
  } else {
    expect_fp8_case(e, spec.distribution, fp8_max_rel_l2_dense);
  }
}

// ---- every test runs once per decode kernel ----
// The parameter picks the kernel for both cache formats: the mma.sync one,
// or the sm_90a wgmma ones (fp8: decode_wgmma_kernel.cuh, bf16:
// decode_bf16_wgmma_kernel.cuh).
using cuda::sm90::DecodeKernelChoice;

class CudaDecode : public ::testing::TestWithParam<DecodeKernelChoice> {
 protected:
  void SetUp() override { cuda::sm90::set_decode_kernel_override(GetParam()); }
  void TearDown() override { cuda::sm90::set_decode_kernel_override(std::nullopt); }
  static std::vector<KvFormat> formats() { return {KvFormat::kBF16, KvFormat::kFP8}; }
};

// ---- shapes: every head count and MTP length, both formats ----
TEST_P(CudaDecode, HeadsAndQueryLengths) {
  SKIP_WITHOUT_HOPPER();
  uint64_t seed = 100;
  for (KvFormat format : formats())
    for (int h_q : {16, 32, 64, 128})
      for (int s_q : {1, 2, 4}) {
        if (h_q * s_q > kMaxQueryRows) continue;
        // Lengths off the page size, one shorter than a page, one long enough to be split.
        expect_case(make_spec(3, s_q, h_q, {389, 45, 1000}, Distribution::kGaussian, ++seed), format);
      }
}

// The acceptance shapes: serving-sized sequences on FlashMLA's data, where
// the fp8 path must stay within 0.04 of the unquantized float64 result.
TEST_P(CudaDecode, Fp8AcceptanceAtServingShapes) {
  SKIP_WITHOUT_HOPPER();
  expect_case(make_spec(4, 1, 128, {4096, 4096, 4096, 4096}, Distribution::kGaussian, 501), KvFormat::kFP8,
              kFp8MaxRelL2Dense);
  expect_case(make_spec(4, 2, 64, {8192, 8192, 8192, 8192}, Distribution::kGaussian, 502), KvFormat::kFP8,
              kFp8MaxRelL2Dense);
  expect_case(make_spec(8, 1, 16, {4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096}, Distribution::kGaussian, 503),
              KvFormat::kFP8, kFp8MaxRelL2Dense);
}

// The wgmma kernels cache their pools' TMA maps. An fp8 pool whose NoPE array
// sits where the last pool's did (freed and reallocated, or shared) but whose
// scales and RoPE do not must get maps of its own: v12's first cache, keyed
// on the NoPE address alone, read the old pool's scales and RoPE here.
TEST_P(CudaDecode, Fp8PoolSharingTheNopeArrayOfTheLast) {
  SKIP_WITHOUT_HOPPER();
  GpuDecode first(make_spec(2, 1, 64, {700, 300}, Distribution::kGaussian, 521), KvFormat::kFP8);
  GpuDecode second(make_spec(2, 1, 64, {700, 300}, Distribution::kGaussian, 522), KvFormat::kFP8);
  ASSERT_EQ(first.host_cache.num_pages, second.host_cache.num_pages);
  first.run();
  // The second pool's NoPE bytes moved into the first's array.
  SNAPMLA_CUDA_CHECK(cudaMemcpy(first.cache_nope.get(), second.cache_nope.get(), second.cache_nope.bytes(),
                                cudaMemcpyDeviceToDevice));
  DecodeParams p = second.params();
  p.cache = KvCacheView::fp8(first.cache_nope.get(), second.cache_scale.get(), second.cache_rope.get(),
                             second.host_cache.num_pages, kGpu);
  const reference::DecodeResult got = second.run(p);
  const reference::DecodeResult paged = second.reference_paged();
  expect_all_written(got, paged);
  EXPECT_LE(reference::compare(got.out, paged.out).rel_l2, kFp8MaxRelL2Paged);
}

// The bf16 cache at serving-sized sequences (many pages per CTA: every stage
// reused many times, and split pieces that start on an odd page).
TEST_P(CudaDecode, Bf16AtServingShapes) {
  SKIP_WITHOUT_HOPPER();
  expect_case(make_spec(4, 1, 128, {4096, 4096, 4096, 4096}, Distribution::kGaussian, 511), KvFormat::kBF16);
  expect_case(make_spec(4, 2, 64, {8192, 5000, 8191, 33}, Distribution::kGaussian, 512), KvFormat::kBF16);
  expect_case(make_spec(8, 1, 16, {4096, 4095, 4097, 4096, 1, 4096, 4096, 4096}, Distribution::kGaussian, 513),
              KvFormat::kBF16);
}

// Head counts that are not a multiple of 16 leave padding rows in the tile.
TEST_P(CudaDecode, OddRowCounts) {
  SKIP_WITHOUT_HOPPER();
  for (KvFormat format : formats())
    for (auto [h_q, s_q] : {std::pair{8, 1}, std::pair{24, 3}, std::pair{40, 2}, std::pair{100, 1}})
      expect_case(make_spec(2, s_q, h_q, {130, 700}, Distribution::kGaussian, 200 + h_q), format);
}

// ---- fp8 accuracy on every distribution (the lead's report reads these lines) ----
TEST_P(CudaDecode, Fp8AllDistributions) {
  SKIP_WITHOUT_HOPPER();
  for (Distribution d : synthetic::all_distributions())
    for (auto [h_q, s_q] : {std::pair{64, 1}, std::pair{16, 2}, std::pair{128, 2}})
      expect_case(make_spec(2, s_q, h_q, {1500, 333}, d, 300 + h_q), KvFormat::kFP8);
}

// Zero-length sequences (lse -inf, out 0), sequences shorter than s_q (rows
// that see nothing under the causal mask), and lengths around a page.
TEST_P(CudaDecode, VarlenWithEmptySequences) {
  SKIP_WITHOUT_HOPPER();
  for (KvFormat format : formats())
    for (int s_q : {1, 4})
      expect_case(make_spec(7, s_q, 16, {0, 1, 2, 63, 64, 65, 0}, Distribution::kGaussian, 400 + s_q), format);
}

// Many short sequences and a few long ones: the schedule splits the long ones
// over many parts and the combine kernel merges them.
TEST_P(CudaDecode, ManyShortFewLongForcesSplits) {
  SKIP_WITHOUT_HOPPER();
  std::mt19937 rng(7);
  std::vector<int32_t> seqlens;
  for (int b = 0; b < 36; ++b) seqlens.push_back(1 + static_cast<int32_t>(rng() % 150));
  for (int32_t long_len : {4100, 2900, 6000, 3333}) seqlens.push_back(long_len);
  std::shuffle(seqlens.begin(), seqlens.end(), rng);
  for (KvFormat format : formats()) {
    const auto spec = make_spec(static_cast<int>(seqlens.size()), 1, 16, seqlens, Distribution::kGaussian, 500);
    expect_case(spec, format);
    // The schedule really split something (otherwise this test would not test the combine).
    GpuDecode decode(spec, format);
    const std::vector<int32_t> splits = decode.num_splits.download<int32_t>();
    EXPECT_GT(splits.back(), decode.batch) << "no sequence was split";
  }
}

// One part: every sequence is a single piece written directly; the result
// must match the split run closely (not bitwise: the summation order differs).
TEST_P(CudaDecode, SinglePartMatchesSplitRun) {
  SKIP_WITHOUT_HOPPER();
  for (KvFormat format : formats()) {
    const auto spec = make_spec(2, 2, 32, {3000, 777}, Distribution::kGaussian, 600);
    GpuDecode split(spec, format), single(spec, format, 1);
    const reference::DecodeResult a = split.run(), b = single.run();
    const reference::ErrorStats diff = reference::compare(a.out, b.out);
    EXPECT_LE(diff.rel_l2, format == KvFormat::kBF16 ? 3e-3 : 6e-3) << kv_format_name(format);
    const reference::DecodeResult ref = single.reference_paged(
        {.quantize_query = format == KvFormat::kFP8, .quantize_p = format == KvFormat::kFP8});
    expect_all_written(b, ref);
    EXPECT_LE(reference::compare(b.out, ref.out).rel_l2,
              format == KvFormat::kBF16 ? kBf16MaxRelL2 : kFp8MaxRelL2Emulated);
  }
}

// The kernel's own query quantization must equal quantize_query's bit for bit,
// so a pre-quantized query gives bitwise the same output.
TEST_P(CudaDecode, PrequantizedQueryIsBitwiseEqual) {
  SKIP_WITHOUT_HOPPER();
  const auto spec = make_spec(3, 2, 64, {900, 64, 1}, Distribution::kLargeQueryRope, 700);
  GpuDecode decode(spec, KvFormat::kFP8);
  decode.run();
  const std::vector<uint16_t> out_inline = decode.out_bits();
  const std::vector<uint32_t> lse_inline = decode.lse_bits();

  const int64_t b = spec.batch, s_q = spec.s_q, h_q = spec.h_q;
  std::vector<uint8_t> q_nope(b * s_q * h_q * kNopeDim);
  std::vector<float> q_scale(b * s_q * h_q);
  std::vector<uint16_t> q_rope(b * s_q * h_q * kRopeDim);
  const Device cpu = Device::cpu();
  quantize_query(TensorView::contiguous(decode.q_bf16.data(), DType::kBFloat16, cpu, {b, s_q, h_q, kHeadDim}),
                 TensorView::contiguous(q_nope.data(), DType::kFloat8E4M3, cpu, {b, s_q, h_q, kNopeDim}),
                 TensorView::contiguous(q_scale.data(), DType::kFloat32, cpu, {b, s_q, h_q}),
                 TensorView::contiguous(q_rope.data(), DType::kBFloat16, cpu, {b, s_q, h_q, kRopeDim}));
  DeviceBuffer d_nope(q_nope), d_scale(q_scale), d_rope(q_rope);
  DecodeParams p = decode.params();
  p.q = TensorView{};
  p.q_nope = TensorView::contiguous(d_nope.get(), DType::kFloat8E4M3, kGpu, {b, s_q, h_q, kNopeDim});
  p.q_scale = TensorView::contiguous(d_scale.get(), DType::kFloat32, kGpu, {b, s_q, h_q});
  p.q_rope = TensorView::contiguous(d_rope.get(), DType::kBFloat16, kGpu, {b, s_q, h_q, kRopeDim});
  decode.run(p);
  EXPECT_TRUE(decode.out_bits() == out_inline) << "out differs between inline and pre-quantized query";
  EXPECT_TRUE(decode.lse_bits() == lse_inline) << "lse differs between inline and pre-quantized query";
}

// Same inputs, same schedule: bitwise the same outputs.
TEST_P(CudaDecode, Deterministic) {
  SKIP_WITHOUT_HOPPER();
  for (KvFormat format : formats()) {
    GpuDecode decode(make_spec(4, 2, 64, {2000, 5, 700, 4000}, Distribution::kHeavyTailNorms, 800), format);
    decode.run();
    const std::vector<uint16_t> out1 = decode.out_bits();
    const std::vector<uint32_t> lse1 = decode.lse_bits();
    decode.run();
    EXPECT_TRUE(decode.out_bits() == out1) << kv_format_name(format);
    EXPECT_TRUE(decode.lse_bits() == lse1) << kv_format_name(format);
  }
}

// ---- bad indices ----
TEST_P(CudaDecode, InvalidPageIdIsAnError) {
  SKIP_WITHOUT_HOPPER();
  for (KvFormat format : formats()) {
    for (int32_t bad_page : {-1, 1 << 20}) {
      auto spec = make_spec(2, 1, 16, {300, 100}, Distribution::kGaussian, 900);
      GpuDecode decode(spec, format);
      std::vector<int32_t> table = decode.workload.block_table;
      table[decode.workload.max_pages + 1] = bad_page;  // sequence 1, page 1 (in use: 100 tokens)
      SNAPMLA_CUDA_CHECK(cudaMemcpy(decode.block_table.get(), table.data(), table.size() * sizeof(int32_t),
                                    cudaMemcpyHostToDevice));
      try {
        mla_decode(decode.params());
        ADD_FAILURE() << "no error for page " << bad_page;
      } catch (const Error& e) {
        EXPECT_EQ(e.argument(), "block_table") << e.what();
      }

      // Unchecked, the kernel must still not read it: the page counts as
      // masked, the status flag says so, and every output is finite.
      (void)cuda::read_and_clear_decode_status(0);
      DecodeParams p = decode.params();
      p.check_indices = false;
      const reference::DecodeResult got = decode.run(p);
      int64_t nonfinite = 0;
      for (double x : got.out) nonfinite += !std::isfinite(x);
      EXPECT_EQ(nonfinite, 0);
      for (double x : got.lse) EXPECT_FALSE(std::isnan(x));
      EXPECT_NE(cuda::read_and_clear_decode_status(0) & cuda::sm90::kStatusBadPage, 0u);
    }
  }
}

TEST_P(CudaDecode, SequenceLongerThanBlockTableIsAnError) {
  SKIP_WITHOUT_HOPPER();
  GpuDecode decode(make_spec(2, 1, 16, {300, 100}, Distribution::kGaussian, 901), KvFormat::kFP8);
  const std::vector<int32_t> seqlens = {300, decode.workload.max_pages * kPageSize + 1};
  SNAPMLA_CUDA_CHECK(
      cudaMemcpy(decode.seqlens.get(), seqlens.data(), seqlens.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  try {
    mla_decode(decode.params());
    ADD_FAILURE() << "no error for a sequence longer than its block table row";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "cache_seqlens") << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(DecodeKernels, CudaDecode,
                         ::testing::Values(DecodeKernelChoice::kMma, DecodeKernelChoice::kWgmma),
                         [](const ::testing::TestParamInfo<DecodeKernelChoice>& info) {
                           return std::string(cuda::sm90::decode_kernel_name(info.param));
                         });

// ---- wgmma kernels: layout diagnostics ----
class ScopedDecodeKernel {
 public:
  explicit ScopedDecodeKernel(DecodeKernelChoice kernel) { cuda::sm90::set_decode_kernel_override(kernel); }
  ~ScopedDecodeKernel() { cuda::sm90::set_decode_kernel_override(std::nullopt); }
  ScopedDecodeKernel(const ScopedDecodeKernel&) = delete;
  ScopedDecodeKernel& operator=(const ScopedDecodeKernel&) = delete;
};

// One sequence of at most one page, one CTA (one part, s_q = 1, so row r is
// head r): the smallest problem that uses every layout of the wgmma kernel
// once. lse depends only on S (the SW128 Q8 / K8 / RoPE tiles, their
// descriptors, the accumulator layout, masking); out also on P^ and V^T (the
// transpose and its token order, the register A fragment, each warpgroup's
// dims [256 g, 256 g + 256) in two n128 halves). The printed breakdown says
// which part is wrong: bad lse = QK; good lse but bad out = PV; bad out in
// some 64-dim blocks only = V^T addressing or a warpgroup's descriptor.
// bf16 (decode_bf16_wgmma_kernel.cuh): lse depends on S (the SW128 Q / page
// tiles, the m64n64 QK, masking) and on the exchange of row maxima between
// the warpgroups; out on P (the register A fragment for a warpgroup's own
// page, the shared P tile for the other's) and the MN-major V descriptor;
// bad out in dims 0..255 or 256..511 only = one warpgroup's V half.
void diagnose_one_tile(int h_q, int seqlen, uint64_t seed, KvFormat format = KvFormat::kFP8) {
  SCOPED_TRACE(std::string(kv_format_name(format)) + " h_q=" + std::to_string(h_q) +
               " seqlen=" + std::to_string(seqlen));
  ScopedDecodeKernel use_wgmma(DecodeKernelChoice::kWgmma);
  const bool fp8 = format == KvFormat::kFP8;
  GpuDecode decode(make_spec(1, 1, h_q, {seqlen}, Distribution::kGaussian, seed), format, 1);
  const reference::DecodeResult got = decode.run();
  const reference::DecodeResult ref = decode.reference_paged({.quantize_query = fp8, .quantize_p = fp8});
  expect_all_written(got, ref);

  int worst_lse_row = 0;
  double worst_lse = 0.0;
  for (int r = 0; r < h_q; ++r) {
    const double err = std::fabs(got.lse[r] - ref.lse[r]) / (1.0 + std::fabs(ref.lse[r]));
    if (!(err <= worst_lse)) worst_lse = err, worst_lse_row = r;  // NaN counts as worst
  }
  std::printf("WGMMA-DIAG fmt=%s h_q=%d seqlen=%d lse_err=%.3e (row %d: got %.6f ref %.6f)\n",
              kv_format_name(format), h_q, seqlen, worst_lse, worst_lse_row, got.lse[worst_lse_row],
              ref.lse[worst_lse_row]);
  constexpr int kBlock = 64;
  std::printf("WGMMA-DIAG out rel err per 64-dim block:");
  for (int block = 0; block < kHeadDimV / kBlock; ++block) {
    std::vector<double> g, e;
    for (int r = 0; r < h_q; ++r)
      for (int d = block * kBlock; d < (block + 1) * kBlock; ++d) {
        g.push_back(got.out[static_cast<size_t>(r) * kHeadDimV + d]);
        e.push_back(ref.out[static_cast<size_t>(r) * kHeadDimV + d]);
      }
    std::printf(" %.2e", reference::compare(g, e).rel_l2);
  }
  std::printf("\nWGMMA-DIAG rows with out rel err > 0.02:");
  int listed = 0;
  for (int r = 0; r < h_q && listed < 16; ++r) {
    const std::vector<double> g(got.out.begin() + r * kHeadDimV, got.out.begin() + (r + 1) * kHeadDimV);
    const std::vector<double> e(ref.out.begin() + r * kHeadDimV, ref.out.begin() + (r + 1) * kHeadDimV);
    const double err = reference::compare(g, e).rel_l2;
    if (!(err <= 0.02)) std::printf(" %d(%.2e)", r, err), ++listed;
  }
  std::printf("%s\nWGMMA-DIAG row 0 dims 0..7 got/ref:", listed == 0 ? " none" : "");
  for (int d = 0; d < 8; ++d) std::printf(" %.4f/%.4f", got.out[d], ref.out[d]);
  std::printf("\n");

  EXPECT_LE(worst_lse, fp8 ? kFp8MaxLseErrEmulated : kBf16MaxLseErr);
  EXPECT_LE(reference::compare(got.out, ref.out).rel_l2, fp8 ? kFp8MaxRelL2Emulated : kBf16MaxRelL2);
}

TEST(CudaDecodeWgmma, OneTileDiagnostics) {
  SKIP_WITHOUT_HOPPER();
  diagnose_one_tile(64, 64, 1001);  // one full page, all 64 rows of the tile
  diagnose_one_tile(64, 40, 1002);  // a partial page: tokens 40..63 masked
  diagnose_one_tile(16, 64, 1003);  // padding rows 16..63
  diagnose_one_tile(64, 128, 1004);  // two pages: the online rescale (beta) and the stage swap
}

TEST(CudaDecodeWgmma, Bf16OneTileDiagnostics) {
  SKIP_WITHOUT_HOPPER();
  diagnose_one_tile(64, 64, 1201, KvFormat::kBF16);   // one full page: WG0's page, no page for WG1
  diagnose_one_tile(64, 40, 1202, KvFormat::kBF16);   // a partial page: tokens 40..63 masked (zero-filled V)
  diagnose_one_tile(16, 64, 1203, KvFormat::kBF16);   // padding rows 16..63
  diagnose_one_tile(64, 128, 1204, KvFormat::kBF16);  // one pair: the max exchange and both P paths
  diagnose_one_tile(64, 300, 1205, KvFormat::kBF16);  // 5 pages: stage reuse, a last pair without page b
}

// The same decode (3 sequences, s_q 2, 64 heads: direct and split pieces) on
// the mma.sync kernel, then on the wgmma kernel: outputs within max_rel_l2
// and lse within max_lse_err of each other.
void expect_wgmma_matches_mma(KvFormat format, uint64_t seed, double max_rel_l2, double max_lse_err) {
  GpuDecode decode(make_spec(3, 2, 64, {1000, 64, 333}, Distribution::kGaussian, seed), format);
  reference::DecodeResult mma, wgmma;
  {
    ScopedDecodeKernel use(DecodeKernelChoice::kMma);
    mma = decode.run();
  }
  {
    ScopedDecodeKernel use(DecodeKernelChoice::kWgmma);
    wgmma = decode.run();
  }
  const reference::ErrorStats out = reference::compare(wgmma.out, mma.out);
  const reference::ErrorStats lse = reference::compare_lse(wgmma.lse, mma.lse);
  const double lse_err = lse_scaled_error(wgmma.lse, mma.lse);
  std::printf("WGMMA-VS-MMA fmt=%s rel_l2=%.3e lse_err=%.3e\n", format == KvFormat::kFP8 ? "fp8" : "bf16",
              out.rel_l2, lse_err);
  EXPECT_EQ(out.nonfinite, 0);
  EXPECT_EQ(lse.nonfinite, 0);
  EXPECT_LE(out.rel_l2, max_rel_l2);
  EXPECT_LE(lse_err, max_lse_err);
}

// Both kernels do the same arithmetic except for summation order and the fp8
// MMA's ~13-bit partial sums (inside a 256-dim QK chunk, a page's PV), which
// occasionally flip an e4m3 rounding of P: the same inputs must give nearly
// the same output (the bound of SinglePartMatchesSplitRun, which differs in the
// same ways); each kernel's lse is within kFp8MaxLseErrEmulated of the emulation.
TEST(CudaDecodeWgmma, MatchesMmaKernel) {
  SKIP_WITHOUT_HOPPER();
  expect_wgmma_matches_mma(KvFormat::kFP8, 1100, 6e-3, 2 * kFp8MaxLseErrEmulated);
}

// bf16: both kernels read the same exact values; they differ in summation
// order and in where P is rounded to bf16 (the wgmma kernel rounds P_a after
// rescaling it to the pair's maximum for the second warpgroup), each ~2^-9
// relative per weight, averaging out: within the bf16 acceptance bound of
// each other.
TEST(CudaDecodeWgmma, Bf16MatchesMmaKernel) {
  SKIP_WITHOUT_HOPPER();
  expect_wgmma_matches_mma(KvFormat::kBF16, 1300, kBf16MaxRelL2, 2 * kBf16MaxLseErr);
}

}  // namespace
}  // namespace snapmla

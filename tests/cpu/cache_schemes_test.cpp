// Pins the direction of the accuracy study (docs/accuracy.md) where it follows
// from the formats themselves, not its exact numbers: RoPE in bf16 costs at
// most one extra bf16 rounding, a per-token scale keeps a small token a
// per-tensor scale loses, a RoPE outlier crushes content only when RoPE shares
// the content's fp8 scale, and the comparison schemes are what they claim.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/numeric.h"
#include "cpu/cache_schemes.h"
#include "cpu/host_cache.h"
#include "snapmla/error.h"
#include "snapmla/kv_cache.h"

namespace snapmla {
namespace {

using schemes::Scheme;

// Relative L2 error of dims [begin, end) of `got` against `want`.
double relative_error(const double* got, const double* want, int begin, int end) {
  double diff = 0, norm = 0;
  for (int i = begin; i < end; ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(diff / norm);
}

// Tokens [n, 576] of bf16-representable gaussian values with standard deviation
// `content_sigma` (c_kv) and `rope_sigma` (k_pe): bf16 is the kernels' input type.
std::vector<double> random_tokens(std::mt19937_64& rng, int n, double content_sigma, double rope_sigma) {
  std::normal_distribution<double> normal;
  std::vector<double> keys(static_cast<size_t>(n) * kHeadDim);
  for (int t = 0; t < n; ++t)
    for (int d = 0; d < kHeadDim; ++d)
      keys[t * kHeadDim + d] = round_to_bf16(static_cast<float>(normal(rng) * (d < kNopeDim ? content_sigma : rope_sigma)));
  return keys;
}

// `keys` [n, 576] written through snapmla::write_kv_cache into a fresh fp8
// cache (slots 0..n-1) and read back as stored.
std::vector<double> through_snapmla_format(const std::vector<double>& keys, testing::HostCache* cache_out = nullptr) {
  const int n = static_cast<int>(keys.size() / kHeadDim);
  std::vector<float> c_kv(static_cast<size_t>(n) * kNopeDim), k_pe(static_cast<size_t>(n) * kRopeDim);
  std::vector<int32_t> slots(n);
  for (int t = 0; t < n; ++t) {
    for (int i = 0; i < kNopeDim; ++i) c_kv[t * kNopeDim + i] = static_cast<float>(keys[t * kHeadDim + i]);
    for (int j = 0; j < kRopeDim; ++j) k_pe[t * kRopeDim + j] = static_cast<float>(keys[t * kHeadDim + kNopeDim + j]);
    slots[t] = t;
  }
  testing::HostCache cache(KvFormat::kFP8, (n + kPageSize - 1) / kPageSize);
  const Device cpu = Device::cpu();
  write_kv_cache(TensorView::contiguous(c_kv.data(), DType::kFloat32, cpu, {n, kNopeDim}),
                 TensorView::contiguous(k_pe.data(), DType::kFloat32, cpu, {n, kRopeDim}),
                 TensorView::contiguous(slots.data(), DType::kInt32, cpu, {n}), cache.view());
  std::vector<double> out = schemes::dequantize_cache_tokens(cache.view(), slots.data(), n);
  if (cache_out) *cache_out = std::move(cache);
  return out;
}

// One e4m3 rounding in the normal range: relative error <= 2^-4 (3 mantissa bits, nearest).
constexpr double kE4M3RelativeBound = 0x1.0p-4;
// One bf16 rounding (8 significant bits, nearest) after one float division: 2^-8 + 2^-23.
constexpr double kBf16RelativeBound = 0x1.0p-8 + 0x1.0p-23;

TEST(CacheSchemes, SnapmlaRopeCostsOneBf16Rounding) {
  std::mt19937_64 rng(11);
  // RoPE values ~1e3 against content ~1e-1: the ranges SnapMLA reports (RoPE to ~1e3).
  const std::vector<double> keys = random_tokens(rng, 96, 0.1, 300.0);
  testing::HostCache cache(KvFormat::kFP8, 1);
  const std::vector<double> got = through_snapmla_format(keys, &cache);
  int inexact = 0;
  for (size_t t = 0; t < keys.size() / kHeadDim; ++t)
    for (int j = kNopeDim; j < kHeadDim; ++j) {
      const double want = keys[t * kHeadDim + j], have = got[t * kHeadDim + j];
      EXPECT_LE(std::fabs(have - want), kBf16RelativeBound * std::fabs(want)) << "token " << t << " dim " << j;
      inexact += have != want;
    }
  // amax/448 is almost never a power of two, so the division really rounds:
  // the bound above is exercised, not trivially met.
  EXPECT_GT(inexact, 0);

  // The reader matches the library's own dequantization (gather_kv_cache,
  // whose bf16 outputs add one rounding of the product).
  const int n = static_cast<int>(keys.size() / kHeadDim);
  std::vector<int32_t> slots(n);
  for (int t = 0; t < n; ++t) slots[t] = t;
  std::vector<uint16_t> nope(static_cast<size_t>(n) * kNopeDim, 0x7fc0), rope(static_cast<size_t>(n) * kRopeDim, 0x7fc0);
  const Device cpu = Device::cpu();
  gather_kv_cache(cache.view(), TensorView::contiguous(slots.data(), DType::kInt32, cpu, {n}),
                  TensorView::contiguous(nope.data(), DType::kBFloat16, cpu, {n, kNopeDim}),
                  TensorView::contiguous(rope.data(), DType::kBFloat16, cpu, {n, kRopeDim}));
  for (int t = 0; t < n; ++t) {
    for (int i = 0; i < kNopeDim; ++i)
      ASSERT_EQ(bf16_bits_to_float(nope[t * kNopeDim + i]), round_to_bf16(static_cast<float>(got[t * kHeadDim + i])));
    for (int j = 0; j < kRopeDim; ++j)
      ASSERT_EQ(bf16_bits_to_float(rope[t * kRopeDim + j]),
                round_to_bf16(static_cast<float>(got[t * kHeadDim + kNopeDim + j])));
  }
}

TEST(CacheSchemes, SnapmlaRopeIsExactWhenTheScaleIsAPowerOfTwo) {
  std::mt19937_64 rng(12);
  std::vector<double> keys = random_tokens(rng, 64, 0.05, 300.0);
  // Content amax = 448 * 2^-e, so scale = 2^-e and k_pe / scale only moves the exponent.
  for (int t = 0; t < 64; ++t) keys[t * kHeadDim + (t * 7) % kNopeDim] = std::ldexp(448.0, -9 - t % 3);
  const std::vector<double> got = through_snapmla_format(keys);
  for (int t = 0; t < 64; ++t)
    for (int j = kNopeDim; j < kHeadDim; ++j) ASSERT_EQ(got[t * kHeadDim + j], keys[t * kHeadDim + j]) << "token " << t;
}

TEST(CacheSchemes, PerTensorScaleLosesASmallTokenPerTokenKeepsIt) {
  std::mt19937_64 rng(13);
  // Token 0 sets the tensor's amax (~1e2); token 1 is ~1e5 times smaller, so
  // under the shared scale its values sit below e4m3's smallest normal 2^-6 * scale.
  std::vector<double> big = random_tokens(rng, 1, 30.0, 30.0);
  std::vector<double> small = random_tokens(rng, 1, 3e-4, 3e-4);
  std::vector<std::vector<double>> cache = {big, small};
  schemes::fake_quantize(Scheme::kFp8PerTensor, cache);
  const double per_tensor = relative_error(cache[1].data(), small.data(), 0, kHeadDim);
  EXPECT_GT(per_tensor, 0.25);  // mostly flushed to zero or to a few subnormal steps

  std::vector<std::vector<double>> per_token_cache = {big, small};
  schemes::fake_quantize(Scheme::kFp8PerToken576, per_token_cache);
  EXPECT_LE(relative_error(per_token_cache[1].data(), small.data(), 0, kHeadDim), kE4M3RelativeBound);
  // The big token itself is fine either way: the difference is the small one's.
  EXPECT_LE(relative_error(cache[0].data(), big.data(), 0, kHeadDim), kE4M3RelativeBound);

  // The snapmla format's content scale is per token too.
  std::vector<double> both = big;
  both.insert(both.end(), small.begin(), small.end());
  const std::vector<double> snap = through_snapmla_format(both);
  EXPECT_LE(relative_error(snap.data() + kHeadDim, small.data(), 0, kNopeDim), kE4M3RelativeBound);
}

TEST(CacheSchemes, RopeOutlierCrushesContentOnlyWhenRopeSharesTheScale) {
  std::mt19937_64 rng(14);
  // Content ~4e-3 against one low-frequency RoPE channel at 1024 (SnapMLA
  // reports RoPE values up to ~1e3): a ratio past e4m3's 448 * 2^6 normal range.
  std::vector<double> token = random_tokens(rng, 1, 0.004, 1.0);
  token[kNopeDim + 62] = 1024.0;
  std::vector<double> per_token = token;
  schemes::fake_quantize_token(Scheme::kFp8PerToken576, per_token.data());
  // scale = 1024/448, so content / scale ~ 2e-3: subnormal, quantum 2^-9
  // (expected relative error ~0.3).
  const double crushed = relative_error(per_token.data(), token.data(), 0, kNopeDim);
  EXPECT_GT(crushed, 0.15);

  const std::vector<double> snap = through_snapmla_format(token);
  EXPECT_LE(relative_error(snap.data(), token.data(), 0, kNopeDim), kE4M3RelativeBound);
  EXPECT_LE(relative_error(snap.data(), token.data(), kNopeDim, kHeadDim), kBf16RelativeBound);
  // The ordinary RoPE channels (all but the outlier) are in e4m3's normal range,
  // yet keep 4 significant bits there against bf16's 8.
  const double snap_rope = relative_error(snap.data(), token.data(), kNopeDim, kNopeDim + 62);
  EXPECT_GT(relative_error(per_token.data(), token.data(), kNopeDim, kNopeDim + 62), 4 * snap_rope);

  std::vector<double> tiles = token;
  schemes::fake_quantize_token(Scheme::kFp8PerTilePow2, tiles.data());
  EXPECT_LE(relative_error(tiles.data(), token.data(), 0, kNopeDim), kE4M3RelativeBound);
}

TEST(CacheSchemes, Pow2TileScalesArePowersOfTwoAtLeastAmaxOver448) {
  std::mt19937_64 rng(15);
  std::uniform_real_distribution<double> exponent(-20.0, 20.0);
  for (int i = 0; i < 2000; ++i) {
    const float amax = static_cast<float>(std::exp2(exponent(rng)));
    const float s = schemes::pow2_scale_from_amax(amax);
    int e = 0;
    ASSERT_EQ(std::frexp(s, &e), 0.5f) << "amax " << amax;
    ASSERT_GE(s, amax / kE4M3Max);
    ASSERT_LT(s, 2.0f * (amax / kE4M3Max));
  }
  EXPECT_EQ(schemes::pow2_scale_from_amax(448.0f), 1.0f);  // exact powers stay put
  EXPECT_EQ(schemes::pow2_scale_from_amax(448.0f * 0x1.0p-12f), 0x1.0p-12f);
  EXPECT_EQ(schemes::pow2_scale_from_amax(0.0f), 1.0f);

  // Every quantized content value is an e4m3 value times its tile's scale,
  // the RoPE dims are bf16, and tiles of very different magnitude each keep
  // e4m3's relative precision.
  std::vector<double> token = random_tokens(rng, 1, 1.0, 10.0);
  for (int i = 0; i < 128; ++i) token[i] *= 1e-4;
  for (int i = 384; i < 512; ++i) token[i] *= 1e3;
  std::vector<double> q = token;
  schemes::fake_quantize_token(Scheme::kFp8PerTilePow2, q.data());
  for (int tile = 0; tile < 4; ++tile) {
    double amax = 0;
    for (int i = tile * 128; i < tile * 128 + 128; ++i) amax = std::max(amax, std::fabs(token[i]));
    const float s = schemes::pow2_scale_from_amax(static_cast<float>(amax));
    for (int i = tile * 128; i < tile * 128 + 128; ++i) {
      const float code = static_cast<float>(q[i] / s);
      ASSERT_EQ(round_to_e4m3(code), code) << "dim " << i;
    }
    EXPECT_LE(relative_error(q.data(), token.data(), tile * 128, tile * 128 + 128), kE4M3RelativeBound) << "tile " << tile;
  }
  for (int j = kNopeDim; j < kHeadDim; ++j) ASSERT_EQ(q[j], round_to_bf16(static_cast<float>(token[j])));
}

TEST(CacheSchemes, SchemesAreWhatTheyClaim) {
  std::mt19937_64 rng(16);
  // bf16 inputs round-trip a bf16 cache exactly; fp8 schemes do not.
  const std::vector<double> keys = random_tokens(rng, 3, 0.1, 0.1);
  std::vector<std::vector<double>> bf16 = {keys};
  schemes::fake_quantize(Scheme::kBF16, bf16);
  EXPECT_EQ(bf16[0], keys);

  // Per-tensor: one scale, so every value is an e4m3 value times amax/448.
  std::vector<std::vector<double>> tensor = {keys};
  schemes::fake_quantize(Scheme::kFp8PerTensor, tensor);
  double amax = 0;
  for (double x : keys) amax = std::max(amax, std::fabs(x));
  const float scale = fp8_scale_from_amax(static_cast<float>(amax));
  int changed = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_EQ(tensor[0][i], schemes::fp8_round_trip(keys[i], scale));
    changed += tensor[0][i] != keys[i];
  }
  EXPECT_GT(changed, 0);

  EXPECT_EQ(schemes::scheme_bytes_per_token(Scheme::kBF16), kv_bytes_per_token(KvFormat::kBF16));
  EXPECT_EQ(schemes::scheme_bytes_per_token(Scheme::kFp8PerTilePow2), 656u);  // FlashMLA's sparse layout
  EXPECT_STREQ(schemes::scheme_name(Scheme::kFp8PerToken576), "fp8-per-token-576");
}

TEST(CacheSchemes, WholeCacheAndPerTokenFormsAgree) {
  // fake_quantize takes a table-lookup path over whole caches; it must give
  // exactly what the per-token form gives, token by token.
  std::mt19937_64 rng(17);
  std::vector<double> keys = random_tokens(rng, 40, 0.2, 5.0);
  for (int t = 0; t < 40; t += 3)
    for (int d = 0; d < kHeadDim; ++d) keys[t * kHeadDim + d] = round_to_bf16(static_cast<float>(keys[t * kHeadDim + d] * 1e3));
  keys[5] = 0.1;  // not bf16-representable: the direct path
  for (Scheme scheme : {Scheme::kBF16, Scheme::kFp8PerToken576, Scheme::kFp8PerTilePow2}) {
    std::vector<std::vector<double>> cache = {keys};
    schemes::fake_quantize(scheme, cache);
    for (int t = 0; t < 40; ++t) {
      std::vector<double> token(keys.begin() + t * kHeadDim, keys.begin() + (t + 1) * kHeadDim);
      schemes::fake_quantize_token(scheme, token.data());
      for (int d = 0; d < kHeadDim; ++d)
        ASSERT_EQ(cache[0][t * kHeadDim + d], token[d]) << schemes::scheme_name(scheme) << " token " << t << " dim " << d;
    }
  }
}

TEST(CacheSchemes, BadArgumentsNameTheArgument) {
  std::vector<double> token(kHeadDim, 0.5);
  try {
    schemes::fake_quantize_token(Scheme::kFp8PerTensor, token.data());
    FAIL() << "per-tensor has no per-token form";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "scheme");
  }
  testing::HostCache cache(KvFormat::kFP8, 1);
  const int32_t bad_slot = kPageSize;
  try {
    schemes::dequantize_cache_tokens(cache.view(), &bad_slot, 1);
    FAIL() << "slot outside the cache";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "slots");
  }
}

}  // namespace
}  // namespace snapmla

#include "cpu/cache_schemes.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include "core/numeric.h"
#include "snapmla/error.h"

namespace snapmla::schemes {
namespace {

float amax_of(const double* v, int64_t n) {
  double amax = 0.0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  return static_cast<float>(amax);
}

void round_to_bf16_in_place(double* v, int n) {
  for (int i = 0; i < n; ++i) v[i] = round_to_bf16(static_cast<float>(v[i]));
}

void fp8_in_place(double* v, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) v[i] = fp8_round_trip(v[i], scale);
}

// With a fixed scale, the e4m3 round trip of a bf16-representable value (the
// kernels' inputs are bf16) depends only on its 16 bits: tabulate it, so a
// whole cache is quantized at table-lookup speed. Same results as
// fp8_round_trip (it fills the table); other values take the direct path.
class Bf16RoundTripTable {
 public:
  explicit Bf16RoundTripTable(float scale) : scale_(scale), table_(1u << 16) {
    for (uint32_t bits = 0; bits < table_.size(); ++bits)
      table_[bits] = fp8_round_trip(bf16_bits_to_float(static_cast<uint16_t>(bits)), scale);
  }
  double operator()(double x) const {
    const float f = static_cast<float>(x);
    const uint16_t bits = float_to_bf16_bits(f);
    return bf16_bits_to_float(bits) == x ? table_[bits] : fp8_round_trip(x, scale_);
  }

 private:
  float scale_;
  std::vector<double> table_;
};

}  // namespace

const char* scheme_name(Scheme scheme) {
  switch (scheme) {
    case Scheme::kBF16: return "bf16";
    case Scheme::kFp8PerTensor: return "fp8-per-tensor-576";
    case Scheme::kFp8PerToken576: return "fp8-per-token-576";
    case Scheme::kFp8PerTilePow2: return "fp8-per-tile-pow2";
  }
  return "unknown";
}

size_t scheme_bytes_per_token(Scheme scheme) {
  switch (scheme) {
    case Scheme::kBF16: return size_t{kHeadDim} * 2;
    case Scheme::kFp8PerTensor: return size_t{kHeadDim};
    case Scheme::kFp8PerToken576: return size_t{kHeadDim} + sizeof(float);
    case Scheme::kFp8PerTilePow2: return size_t{kNopeDim} + 4 * sizeof(float) + size_t{kRopeDim} * 2;  // 656
  }
  return 0;
}

std::vector<Scheme> all_fake_quant_schemes() {
  return {Scheme::kBF16, Scheme::kFp8PerTensor, Scheme::kFp8PerToken576, Scheme::kFp8PerTilePow2};
}

float pow2_scale_from_amax(float amax) {
  if (!(amax > 0.0f)) return 1.0f;
  // frexp is exact, unlike log2 + ceil, which can round a power of two up.
  int e = 0;
  const float f = std::frexp(amax / kE4M3Max, &e);  // amax/448 = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0f, f == 0.5f ? e - 1 : e);
}

double fp8_round_trip(double value, float scale) {
  return static_cast<double>(round_to_e4m3(static_cast<float>(value) / scale)) * scale;
}

void fake_quantize_token(Scheme scheme, double* key) {
  switch (scheme) {
    case Scheme::kBF16:
      round_to_bf16_in_place(key, kHeadDim);
      return;
    case Scheme::kFp8PerToken576:
      fp8_in_place(key, kHeadDim, fp8_scale_from_amax(amax_of(key, kHeadDim)));
      return;
    case Scheme::kFp8PerTilePow2:
      for (int tile = 0; tile < kNopeDim / 128; ++tile) {
        double* v = key + tile * 128;
        fp8_in_place(v, 128, pow2_scale_from_amax(amax_of(v, 128)));
      }
      round_to_bf16_in_place(key + kNopeDim, kRopeDim);
      return;
    case Scheme::kFp8PerTensor:
      break;
  }
  throw Error("scheme", std::string(scheme_name(scheme)) + " has no per-token form (its scale spans the cache)");
}

void fake_quantize(Scheme scheme, std::vector<std::vector<double>>& keys) {
  if (scheme == Scheme::kFp8PerTensor) {
    float amax = 0.0f;
    for (const auto& seq : keys) amax = std::max(amax, amax_of(seq.data(), static_cast<int64_t>(seq.size())));
    const Bf16RoundTripTable round_trip(fp8_scale_from_amax(amax));
    for (auto& seq : keys)
      for (double& x : seq) x = round_trip(x);
    return;
  }
  if (scheme == Scheme::kFp8PerTilePow2) {
    // Tile scales are powers of two, so only a few dozen distinct ones occur.
    std::map<float, Bf16RoundTripTable> tables;
    for (auto& seq : keys)
      for (size_t t = 0; t + kHeadDim <= seq.size(); t += kHeadDim) {
        for (int tile = 0; tile < kNopeDim / 128; ++tile) {
          double* v = &seq[t + tile * 128];
          const float scale = pow2_scale_from_amax(amax_of(v, 128));
          const Bf16RoundTripTable& round_trip = tables.try_emplace(scale, scale).first->second;
          for (int i = 0; i < 128; ++i) v[i] = round_trip(v[i]);
        }
        round_to_bf16_in_place(&seq[t + kNopeDim], kRopeDim);
      }
    return;
  }
  for (auto& seq : keys)
    for (size_t t = 0; t + kHeadDim <= seq.size(); t += kHeadDim) fake_quantize_token(scheme, &seq[t]);
}

std::vector<double> dequantize_cache_tokens(const KvCacheView& cache, const int32_t* slots, int64_t n) {
  if (cache.device().type != DeviceType::kCPU) throw Error("cache", "must be a CPU view");
  const bool contiguous = cache.format == KvFormat::kBF16
                              ? cache.data.is_contiguous()
                              : cache.nope.is_contiguous() && cache.scale.is_contiguous() && cache.rope.is_contiguous();
  if (!contiguous) throw Error("cache", "must be contiguous");
  const int64_t num_slots = cache.num_pages() * kPageSize;
  std::vector<double> keys(static_cast<size_t>(n) * kHeadDim);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= num_slots)
      throw Error("slots", "entry " + std::to_string(t) + " is " + std::to_string(slot) + ", outside the cache");
    double* dst = &keys[t * kHeadDim];
    if (cache.format == KvFormat::kBF16) {
      const uint16_t* src = cache.data.ptr<const uint16_t>() + slot * kHeadDim;
      for (int i = 0; i < kHeadDim; ++i) dst[i] = bf16_bits_to_float(src[i]);
    } else {
      const double scale = cache.scale.ptr<const float>()[slot];
      const uint8_t* nope = cache.nope.ptr<const uint8_t>() + slot * kNopeDim;
      const uint16_t* rope = cache.rope.ptr<const uint16_t>() + slot * kRopeDim;
      for (int i = 0; i < kNopeDim; ++i) dst[i] = e4m3_bits_to_float(nope[i]) * scale;
      for (int j = 0; j < kRopeDim; ++j) dst[kNopeDim + j] = bf16_bits_to_float(rope[j]) * scale;
    }
  }
  return keys;
}

}  // namespace snapmla::schemes

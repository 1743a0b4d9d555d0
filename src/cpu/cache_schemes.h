// Alternative KV-cache quantization schemes for the accuracy study
// (docs/accuracy.md): each one quantizes and dequantizes keys held as doubles
// ("fake quantization"), so its decode error can be measured with the same
// float64 oracle as the real formats. The snapmla fp8 format is NOT here: the
// study writes it through snapmla::write_kv_cache and reads it back with
// dequantize_cache_tokens, so it measures the library's own path.
//
// Keys are laid out as reference::decode_dense wants them: [n, 576] row-major,
// the 512 content dims (c_kv) then the 64 RoPE dims (k_pe).
#pragma once

#include <cstdint>
#include <vector>

#include "snapmla/kv_format.h"

namespace snapmla::schemes {

enum class Scheme {
  kBF16,              // every value rounded to bf16 (FlashMLA's dense cache)
  kFp8PerTensor,      // all 576 dims e4m3, one scale = amax over the whole cache / 448
  kFp8PerToken576,    // all 576 dims e4m3, one scale per token = amax over its 576 dims / 448
  kFp8PerTilePow2,    // 4 tiles of 128 content dims e4m3 with power-of-two scales, RoPE bf16
                      // (FlashMLA's 656-byte sparse-decode layout)
};

const char* scheme_name(Scheme scheme);
// Cache bytes per token, scales included (per-tensor: its one scale is not counted).
size_t scheme_bytes_per_token(Scheme scheme);
std::vector<Scheme> all_fake_quant_schemes();

// FlashMLA's sparse-layout tile scale: 2^ceil(log2(amax / 448)), 1 when amax is 0.
// Always >= amax / 448, so tile values never saturate.
float pow2_scale_from_amax(float amax);

// One value through e4m3 with `scale` (value / scale rounded in float, as the
// cache writers do), returned dequantized.
double fp8_round_trip(double value, float scale);

// Quantizes and dequantizes, in place, every token of every sequence of one
// cache (per-tensor: the amax is taken over all sequences together, which is
// what one scale for a layer's cache means). keys[b] is [s_k(b), 576].
void fake_quantize(Scheme scheme, std::vector<std::vector<double>>& keys);

// The same for one token's 576 values (not defined for kFp8PerTensor, whose
// scale is a property of the whole cache: use fp8_round_trip with it).
void fake_quantize_token(Scheme scheme, double* key576);

// Keys of `n` tokens read back from a paged cache of either format, exactly as
// stored (fp8: e4m3 content and bf16 RoPE both times the token's fp32 scale,
// in double, as reference::decode_paged reads them; no bf16 rounding of the
// product as gather_kv_cache's bf16 outputs would add). `cache` must be a CPU view.
std::vector<double> dequantize_cache_tokens(const KvCacheView& cache, const int32_t* slots, int64_t n);

}  // namespace snapmla::schemes

// The fp8 format's quantization of one 576-wide vector (a cache token or a
// query row): one scale for the 512 content values, and the 64 RoPE values
// divided by that same scale (SnapMLA Eq. 6, "scale-domain alignment"), so
// q.k = s_q * s_k * (q8 . k8 + q_rope . k_rope). docs/kv-format.md is the spec.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/numeric.h"
#include "snapmla/kv_format.h"

namespace snapmla::cpu {

// nope_in [512], rope_in [64] (floats); writes e4m3 / bf16 codes and returns the scale.
inline float quantize_token(const float* nope_in, const float* rope_in, uint8_t* nope_out, uint16_t* rope_out) {
  float amax = 0.0f;
  for (int i = 0; i < kNopeDim; ++i) amax = std::fmax(amax, std::fabs(nope_in[i]));
  const float scale = fp8_scale_from_amax(amax);
  for (int i = 0; i < kNopeDim; ++i) nope_out[i] = float_to_e4m3_bits(nope_in[i] / scale);
  for (int j = 0; j < kRopeDim; ++j) rope_out[j] = float_to_bf16_bits(rope_in[j] / scale);
  return scale;
}

}  // namespace snapmla::cpu

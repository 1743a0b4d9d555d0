// Scalar conversions shared by the CPU reference and the CUDA kernels. The
// software versions here define the rounding; the GPU kernels may use the
// hardware converters and tests/cuda checks they agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/host_device.h"

namespace snapmla {

SNAPMLA_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

SNAPMLA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ---- bfloat16: round to nearest even; NaN stays a quiet NaN ----
SNAPMLA_HD uint16_t float_to_bf16_bits(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
SNAPMLA_HD float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }
SNAPMLA_HD float round_to_bf16(float x) { return bf16_bits_to_float(float_to_bf16_bits(x)); }

// ---- float8 e4m3 (OCP "e4m3fn": bias 7, no inf, max 448, NaN = 0x7f) ----
// Round to nearest even, saturating finite values to +-448 (PTX cvt.rn.satfinite).
SNAPMLA_HD uint8_t float_to_e4m3_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return sign | 0x7f;  // NaN
  const float a = fabsf(x);
  if (a >= 448.0f) return sign | 0x7e;  // saturate (inf included)
  if (a == 0.0f) return sign;
  int e2;
  frexpf(a, &e2);  // a = f * 2^e2, f in [0.5, 1)
  int e = e2 - 1;  // a in [2^e, 2^(e+1))
  if (e < -6) e = -6;  // subnormal range shares the quantum 2^-9
  // Quantum is 2^(e-3); the quotient is exact (power-of-two scaling).
  const float q = rintf(ldexpf(a, 3 - e));  // nearest even, in [0, 16]
  const int m = static_cast<int>(q);
  // e == -6 and m < 8 is subnormal (exponent field 0); m == 16 rolls into the
  // next exponent, which the addition below does by carrying.
  const int code = (e == -6 && m < 8) ? m : ((e + 7) << 3) + (m - 8);
  return sign | static_cast<uint8_t>(code);
}

SNAPMLA_HD float e4m3_bits_to_float(uint8_t b) {
  const int exp = (b >> 3) & 0xf;
  const int man = b & 0x7;
  float v;
  if (exp == 0xf && man == 0x7) {
    v = bits_float(0x7fc00000u);
  } else if (exp == 0) {
    v = ldexpf(static_cast<float>(man), -9);
  } else {
    v = ldexpf(static_cast<float>(8 + man), exp - 10);
  }
  return (b & 0x80) ? -v : v;
}

SNAPMLA_HD float round_to_e4m3(float x) { return e4m3_bits_to_float(float_to_e4m3_bits(x)); }

// ---- the per-token (and per query row) scale of the fp8 format ----
// scale = amax / 448, and 1 for an all-zero vector (no division by zero). The
// scale never goes below the smallest normal float, so values / scale stay
// finite even for vectors of subnormal floats.
SNAPMLA_HD float fp8_scale_from_amax(float amax) {
  return amax > 0.0f ? fmaxf(amax / 448.0f, 1.17549435e-38f) : 1.0f;
}

SNAPMLA_HD bool is_finite_float(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }

}  // namespace snapmla

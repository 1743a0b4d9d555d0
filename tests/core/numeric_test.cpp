// Pins the rounding rules of src/core/numeric.h and the cache byte layout.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "core/numeric.h"
#include "snapmla/kv_format.h"

namespace snapmla {
namespace {

TEST(KvFormatLayout, BytesPerTokenAndPage) {
  EXPECT_EQ(kv_bytes_per_token(KvFormat::kBF16), 1152u);
  EXPECT_EQ(kv_bytes_per_token(KvFormat::kFP8), 644u);
  EXPECT_EQ(kv_bytes_per_page(KvFormat::kBF16), 73728u);
  EXPECT_EQ(kv_bytes_per_page(KvFormat::kFP8), 41216u);
  // The fp8 page is three planar sections: TMA boxes of 32 KiB, 256 B and 8 KiB.
  EXPECT_EQ(size_t{kPageSize} * kNopeDim * 1, 32768u);
  EXPECT_EQ(size_t{kPageSize} * sizeof(float), 256u);
  EXPECT_EQ(size_t{kPageSize} * kRopeDim * 2, 8192u);
  EXPECT_EQ(32768u + 256u + 8192u, kv_bytes_per_page(KvFormat::kFP8));
  EXPECT_EQ(kHeadDim, 576);
  EXPECT_EQ(kPageSize, 64);
}

TEST(KvFormatLayout, NamesParse) {
  KvFormat f = KvFormat::kBF16;
  EXPECT_TRUE(parse_kv_format("fp8", &f));
  EXPECT_EQ(f, KvFormat::kFP8);
  EXPECT_TRUE(parse_kv_format("bf16", &f));
  EXPECT_EQ(f, KvFormat::kBF16);
  EXPECT_FALSE(parse_kv_format("fp16", &f));
  EXPECT_STREQ(kv_format_name(KvFormat::kFP8), "fp8");
}

TEST(E4M3, EdgeValues) {
  EXPECT_EQ(float_to_e4m3_bits(448.0f), 0x7e);
  EXPECT_EQ(float_to_e4m3_bits(-448.0f), 0xfe);
  // Saturating (satfinite): everything above 448, up to and past the
  // rounding boundary 464 and infinity, becomes 448.
  EXPECT_EQ(float_to_e4m3_bits(449.0f), 0x7e);
  EXPECT_EQ(float_to_e4m3_bits(463.99f), 0x7e);
  EXPECT_EQ(float_to_e4m3_bits(464.0f), 0x7e);
  EXPECT_EQ(float_to_e4m3_bits(1e30f), 0x7e);
  EXPECT_EQ(float_to_e4m3_bits(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(float_to_e4m3_bits(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(float_to_e4m3_bits(416.0f), 0x7d);  // 1.625 * 2^8
  // Subnormals: quantum 2^-9.
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -9)), 0x01);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -8)), 0x02);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(3.0f, -9)), 0x03);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -7)), 0x04);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(7.0f, -9)), 0x07);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -6)), 0x08);  // smallest normal
  EXPECT_EQ(float_to_e4m3_bits(-std::ldexp(1.0f, -6)), 0x88);
  // Below half the smallest subnormal: zero; exactly half: tie to even (0).
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -11)), 0x00);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -10)), 0x00);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -10) * 1.0001f), 0x01);
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(3.0f, -10)), 0x02);  // 1.5 quanta: to even 2
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(15.0f, -10)), 0x08);  // 7.5 quanta: to even 8 = 2^-6
  // Signed zeros keep their sign.
  EXPECT_EQ(float_to_e4m3_bits(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3_bits(-0.0f), 0x80);
  // Normal ties: 1 + 1/16 lies between 1 (0x38) and 1.125 (0x39).
  EXPECT_EQ(float_to_e4m3_bits(1.0625f), 0x38);
  EXPECT_EQ(float_to_e4m3_bits(1.1875f), 0x3a);
  EXPECT_EQ(float_to_e4m3_bits(-1.1875f), 0xba);
  EXPECT_EQ(float_to_e4m3_bits(1.9375f), 0x40);  // rounds up into the next binade: 2.0
  EXPECT_EQ(float_to_e4m3_bits(1.0f), 0x38);
  // NaN maps to the NaN code and keeps the sign.
  EXPECT_EQ(float_to_e4m3_bits(std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(float_to_e4m3_bits(-std::numeric_limits<float>::quiet_NaN()), 0xff);
  EXPECT_TRUE(std::isnan(e4m3_bits_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_bits_to_float(0xff)));
  EXPECT_EQ(e4m3_bits_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_bits_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::signbit(e4m3_bits_to_float(0x80)));
}

TEST(E4M3, AllCodesRoundTrip) {
  int finite = 0;
  for (int code = 0; code < 256; ++code) {
    const float v = e4m3_bits_to_float(static_cast<uint8_t>(code));
    if ((code & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v)) << code;
      continue;
    }
    ++finite;
    EXPECT_EQ(float_to_e4m3_bits(v), code) << "code " << code << " value " << v;
    if (code > 0 && code < 0x7e) {  // values increase with the code
      EXPECT_LT(v, e4m3_bits_to_float(static_cast<uint8_t>(code + 1)));
    }
  }
  EXPECT_EQ(finite, 254);
}

// An independent quantizer: nearest of the 127 non-negative finite values,
// ties to the even code, saturating beyond 448.
uint8_t nearest_e4m3(float x) {
  if (std::isnan(x)) return std::signbit(x) ? 0xff : 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return sign | 0x7e;
  int best = 0;
  double best_err = a;
  for (int code = 1; code <= 0x7e; ++code) {
    const double err = std::fabs(static_cast<double>(e4m3_bits_to_float(static_cast<uint8_t>(code))) - a);
    if (err < best_err || (err == best_err && code % 2 == 0)) {
      best = code;
      best_err = err;
    }
  }
  return sign | static_cast<uint8_t>(best);
}

TEST(E4M3, MatchesNearestValueSearch) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> exponent(-14.0, 10.0);
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    float x;
    if (i % 4 == 3) {
      // Random bit patterns: every exponent, NaN and inf included.
      x = bits_float(static_cast<uint32_t>(rng()));
    } else if (i % 4 == 2) {
      // Exact midpoints between neighbouring codes (the tie cases).
      const int code = static_cast<int>(rng() % 0x7e);
      x = 0.5f * (e4m3_bits_to_float(static_cast<uint8_t>(code)) + e4m3_bits_to_float(static_cast<uint8_t>(code + 1)));
      if (rng() & 1) x = -x;
    } else {
      x = static_cast<float>(std::exp2(exponent(rng)));
      if (rng() & 1) x = -x;
    }
    ASSERT_EQ(float_to_e4m3_bits(x), nearest_e4m3(x)) << "x = " << x;
    ++checked;
  }
  EXPECT_EQ(checked, 200000);
}

TEST(BF16, RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16_bits(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even mantissa (1).
  EXPECT_EQ(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_EQ(float_to_bf16_bits(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16_bits(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(float_to_bf16_bits(bits_float(0x7f7fffffu)), 0x7f80);  // FLT_MAX rounds to inf
  EXPECT_TRUE(std::isnan(round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(std::isnan(round_to_bf16(bits_float(0x7f800001u))));  // a signalling NaN stays NaN
  EXPECT_EQ(bf16_bits_to_float(0x4049), 3.140625f);
}

TEST(Fp8Scale, AmaxOver448AndOneForZero) {
  EXPECT_EQ(fp8_scale_from_amax(0.0f), 1.0f);
  EXPECT_EQ(fp8_scale_from_amax(448.0f), 1.0f);
  EXPECT_EQ(fp8_scale_from_amax(7.0f), 1.0f / 64.0f);
  EXPECT_FLOAT_EQ(fp8_scale_from_amax(1.0f), 1.0f / 448.0f);
  EXPECT_TRUE(is_finite_float(1.0f));
  EXPECT_FALSE(is_finite_float(std::numeric_limits<float>::infinity()));
  EXPECT_FALSE(is_finite_float(std::numeric_limits<float>::quiet_NaN()));
}

}  // namespace
}  // namespace snapmla

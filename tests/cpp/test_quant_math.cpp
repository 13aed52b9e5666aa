// Unit tests of csrc/include/kvcompact/quant_math.h, the math both backends run.
//
// The branch-free fp8 encoders are checked exhaustively against c10's own
// conversions (the ones torch's fp32 -> float8 cast uses) over every fp32 value
// the encoders can receive: all finite floats with |x| <= QMAX.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kvcompact/quant_math.h"

namespace kvcompact {
namespace {

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

template <typename Encode, typename Reference>
int64_t count_mismatches_up_to(float qmax, Encode encode, Reference reference) {
  int64_t mismatches = 0;
  const uint32_t last = to_bits(qmax);
  for (uint32_t mag = 0; mag <= last; ++mag) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float q = from_bits(mag | sign);
      mismatches += encode(q) != reference(q);
    }
  }
  return mismatches;
}

TEST(Fp8Encode, E4M3MatchesC10OnEveryClampedFloat) {
  EXPECT_EQ(count_mismatches_up_to(448.0f, fp8_e4m3_from_clamped,
                                   c10::detail::fp8e4m3fn_from_fp32_value),
            0);
}

TEST(Fp8Encode, E5M2MatchesC10OnEveryClampedFloat) {
  EXPECT_EQ(count_mismatches_up_to(57344.0f, fp8_e5m2_from_clamped,
                                   c10::detail::fp8e5m2_from_fp32_value),
            0);
}

TEST(Int8Encode, RoundsHalfToEvenLikeRintf) {
  // Every float in [-127, 127] at the finest spacing near the halfway points.
  for (float q = -127.0f; q <= 127.0f; q = std::nextafter(q, 200.0f)) {
    ASSERT_EQ(round_half_even_small(q), std::rint(q)) << q;
    if (std::fabs(q) > 1.0f) q += 1.0f / 4096;  // sample the bulk, keep it fast
  }
  EXPECT_EQ(round_half_even_small(0.5f), 0.0f);
  EXPECT_EQ(round_half_even_small(1.5f), 2.0f);
  EXPECT_EQ(round_half_even_small(2.5f), 2.0f);
  EXPECT_EQ(round_half_even_small(-2.5f), -2.0f);
}

TEST(GroupScale, ContractRules) {
  GroupStats zero;
  EXPECT_EQ(group_scale(zero, 448.0f), 1.0f);

  GroupStats normal;
  normal.add(-896.0f);
  normal.add(3.0f);
  EXPECT_EQ(group_scale(normal, 448.0f), 2.0f);

  GroupStats tiny;  // absmax / QMAX underflows: floored at 2^-149
  tiny.add(from_bits(1));
  EXPECT_EQ(group_scale(tiny, 127.0f), kMinScale);
  EXPECT_GT(kMinScale, 0.0f);

  for (float bad : {NAN, INFINITY, -INFINITY}) {
    GroupStats s;
    s.add(1.0f);
    s.add(bad);
    EXPECT_TRUE(std::isnan(group_scale(s, 127.0f)));
  }
}

TEST(GroupStats, ElementwiseAddEqualsBitMax) {
  const float values[] = {0.0f, -0.0f, 1.5f, -7.25f, 1e-40f, -3e38f, 65504.0f};
  GroupStats by_add;
  uint32_t max_bits = 0;
  for (float v : values) {
    by_add.add(v);
    max_bits = std::max(max_bits, abs_bits(v));
  }
  const GroupStats by_bits = GroupStats::from_max_abs_bits(max_bits);
  EXPECT_EQ(by_add.absmax, by_bits.absmax);
  EXPECT_EQ(by_add.nonfinite, by_bits.nonfinite);
  EXPECT_FALSE(by_bits.nonfinite);
  EXPECT_TRUE(GroupStats::from_max_abs_bits(abs_bits(NAN)).nonfinite);
  EXPECT_TRUE(GroupStats::from_max_abs_bits(abs_bits(-INFINITY)).nonfinite);
}

TEST(Encode, NonFiniteGroupGivesZeroCodes) {
  EXPECT_EQ(encode<QuantFormat::kFp8E4M3>(3.0f, NAN), 0);
  EXPECT_EQ(encode<QuantFormat::kFp8E5M2>(-3.0f, NAN), 0);
  EXPECT_EQ(encode<QuantFormat::kInt8>(3.0f, NAN), 0);
}

TEST(Encode, ClampsPastTheFormatMax) {
  EXPECT_EQ(encode<QuantFormat::kInt8>(1000.0f, 1.0f), 127);
  EXPECT_EQ(encode<QuantFormat::kInt8>(-1000.0f, 1.0f), -127);
  EXPECT_EQ(decode<QuantFormat::kFp8E4M3>(encode<QuantFormat::kFp8E4M3>(1e30f, 1.0f)), 448.0f);
  EXPECT_EQ(decode<QuantFormat::kFp8E5M2>(encode<QuantFormat::kFp8E5M2>(-1e30f, 1.0f)),
            -57344.0f);
}

TEST(Decode, RoundTripsEveryFiniteCode) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const float v = decode<QuantFormat::kFp8E4M3>(code);
    if (std::isfinite(v) && std::fabs(v) <= 448.0f) {
      const uint8_t back = encode<QuantFormat::kFp8E4M3>(v, 1.0f);
      // -0 and +0 both encode from their own sign
      EXPECT_EQ(back, code) << c;
    }
    const float w = decode<QuantFormat::kFp8E5M2>(code);
    if (std::isfinite(w)) {
      EXPECT_EQ(encode<QuantFormat::kFp8E5M2>(w, 1.0f), code) << c;
    }
  }
  for (int c = -127; c <= 127; ++c) {
    EXPECT_EQ(encode<QuantFormat::kInt8>(decode<QuantFormat::kInt8>(static_cast<int8_t>(c)), 1.0f),
              c);
  }
}

}  // namespace
}  // namespace kvcompact

// Scalar quantization math shared by the CPU loops and the CUDA kernels.
//
// This header is the single source of truth for the bit-exact contract stated
// in docs/kernels.md; kvcompact/reference.py restates it in plain torch. Everything here
// is C10_HOST_DEVICE and header-only (it needs c10's float8 conversions, which
// are themselves header-only), so host code, device code and the GoogleTest
// unit tests all compile exactly the same arithmetic.
//
//   absmax = max |x_i| over the group, in fp32
//   scale  = absmax / QMAX (IEEE fp32 division); 1.0 when absmax == 0; never
//            below the smallest positive fp32 (see kMinScale)
//   code_i = convert(clamp(x_i / scale, -QMAX, QMAX))
//   y_i    = float(code_i) * scale, rounded to the output dtype
//   a group holding NaN or +-Inf gets scale = NaN and codes 0 (it dequantizes
//   to NaN); other groups are untouched.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/floating_point_utils.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace kvcompact {

// Values are part of the op schema's contract with Python (the `fmt` string is
// parsed into this enum in checks.h); do not renumber.
enum class QuantFormat : int { kFp8E4M3 = 0, kFp8E5M2 = 1, kInt8 = 2 };

// Calls fn(std::integral_constant<QuantFormat, F>{}) for the runtime format, so
// every backend turns `fmt` into a template argument in one place.
template <typename Fn>
inline void dispatch_format(QuantFormat fmt, Fn&& fn) {
  switch (fmt) {
    case QuantFormat::kFp8E4M3: fn(std::integral_constant<QuantFormat, QuantFormat::kFp8E4M3>{}); break;
    case QuantFormat::kFp8E5M2: fn(std::integral_constant<QuantFormat, QuantFormat::kFp8E5M2>{}); break;
    case QuantFormat::kInt8: fn(std::integral_constant<QuantFormat, QuantFormat::kInt8>{}); break;
  }
}

template <QuantFormat F>
struct FormatTraits;

template <>
struct FormatTraits<QuantFormat::kFp8E4M3> {
  using code_t = uint8_t;  // bit pattern of torch.float8_e4m3fn
  static constexpr float kQmax = 448.0f;
};

template <>
struct FormatTraits<QuantFormat::kFp8E5M2> {
  using code_t = uint8_t;  // bit pattern of torch.float8_e5m2
  static constexpr float kQmax = 57344.0f;
};

template <>
struct FormatTraits<QuantFormat::kInt8> {
  using code_t = int8_t;
  static constexpr float kQmax = 127.0f;
};

// absmax / QMAX underflows to zero for groups whose largest magnitude is a tiny
// subnormal (below QMAX * 2^-149). A zero scale would turn every code into
// x / 0 = Inf or NaN, so the scale is floored at the smallest positive fp32;
// codes then stay within +-QMAX because |x| <= absmax < QMAX * 2^-149.
constexpr float kMinScale = 1.40129846e-45f;  // 2^-149

C10_HOST_DEVICE inline bool is_finite(float v) {
  // Written out (rather than std::isfinite) so host and device agree without
  // depending on which math library the compiler picks.
  return (v - v) == 0.0f;
}

C10_HOST_DEVICE inline float quiet_nan() {
  return std::numeric_limits<float>::quiet_NaN();
}

// The reduction of a group is done on bit patterns: for IEEE floats,
// |x|'s bits (sign cleared) order like |x| itself, and every NaN/Inf has bits
// >= 0x7F800000. So a single unsigned max over `abs_bits` gives both absmax and
// "the group is non-finite", and it vectorizes (CPU) and shuffles (CUDA) as
// plain integer max with no NaN special cases.
constexpr uint32_t kInfBits = 0x7F800000u;

C10_HOST_DEVICE inline uint32_t abs_bits(float v) {
  return c10::detail::fp32_to_bits(v) & 0x7FFFFFFFu;
}

struct GroupStats {
  float absmax = 0.0f;
  bool nonfinite = false;

  C10_HOST_DEVICE static inline GroupStats from_max_abs_bits(uint32_t max_bits) {
    GroupStats s;
    s.nonfinite = max_bits >= kInfBits;
    s.absmax = c10::detail::fp32_from_bits(max_bits);
    return s;
  }

  // Element-at-a-time forms of the same reduction (strided paths, CUDA
  // shuffles): equivalent to a max over abs_bits.
  C10_HOST_DEVICE inline void add(float v) {
    const uint32_t b = abs_bits(v);
    nonfinite = nonfinite || b >= kInfBits;
    const float a = c10::detail::fp32_from_bits(b);
    absmax = (b < kInfBits && a > absmax) ? a : absmax;
  }

  C10_HOST_DEVICE inline void merge(const GroupStats& other) {
    absmax = other.absmax > absmax ? other.absmax : absmax;
    nonfinite = nonfinite || other.nonfinite;
  }
};

C10_HOST_DEVICE inline float group_scale(const GroupStats& s, float qmax) {
  if (s.nonfinite) {
    return quiet_nan();
  }
  if (s.absmax == 0.0f) {
    return 1.0f;
  }
  const float scale = s.absmax / qmax;
  return scale < kMinScale ? kMinScale : scale;
}

template <QuantFormat F>
C10_HOST_DEVICE inline float clamp_to_qmax(float q) {
  constexpr float qmax = FormatTraits<F>::kQmax;
  return q > qmax ? qmax : (q < -qmax ? -qmax : q);
}

// Round half to even for |q| < 2^22 with plain IEEE adds: adding 1.5 * 2^23
// pushes the fraction bits out under the default rounding mode, and
// subtracting it back is exact. Equal to rintf(q) on that range (|q| <= 127
// here) but branch-free and vectorizable on every x86 level. Compilers may not
// fold (q + C) - C without -ffast-math, which the build never uses.
C10_HOST_DEVICE inline float round_half_even_small(float q) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (q + kMagic) - kMagic;
}

// fp32 -> float8 for inputs already clamped to +-QMAX, bit-identical to c10's
// fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value on that range (checked
// exhaustively in tests/cpp). Both rounding paths are computed and one is
// selected, so the loop has no branches and vectorizes; c10's versions branch.
//   subnormal outputs: add a magic float so the FPU rounds at the right bit;
//   normal outputs: rebias the exponent and round to nearest even by hand.
template <int kMantBits, int kBias, uint32_t kMinNormalBits, uint32_t kDenormMaskBits>
C10_HOST_DEVICE inline uint8_t fp8_from_clamped(float q) {
  const uint32_t bits = c10::detail::fp32_to_bits(q);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t mag = bits ^ sign;
  const uint32_t sub = c10::detail::fp32_to_bits(c10::detail::fp32_from_bits(mag) +
                                                 c10::detail::fp32_from_bits(kDenormMaskBits)) -
                       kDenormMaskBits;
  constexpr int kShift = 23 - kMantBits;
  const uint32_t mant_odd = (mag >> kShift) & 1u;
  const uint32_t norm =
      (mag + (static_cast<uint32_t>(kBias - 127) << 23) + ((1u << (kShift - 1)) - 1u) + mant_odd) >>
      kShift;
  const uint32_t code = mag < kMinNormalBits ? sub : norm;
  return static_cast<uint8_t>(code | (sign >> 24));
}

C10_HOST_DEVICE inline uint8_t fp8_e4m3_from_clamped(float q) {
  // min normal 2^-6 (121 << 23); denorm magic ((127 - 7) + (23 - 3) + 1) << 23
  return fp8_from_clamped<3, 7, (121u << 23), (141u << 23)>(q);
}

C10_HOST_DEVICE inline uint8_t fp8_e5m2_from_clamped(float q) {
  // min normal 2^-14 (113 << 23); denorm magic ((127 - 15) + (23 - 2) + 1) << 23
  return fp8_from_clamped<2, 15, (113u << 23), (134u << 23)>(q);
}

// One element's code. `scale` is the group's scale from group_scale(); a NaN
// scale marks a non-finite group, whose codes are all zero.
template <QuantFormat F>
C10_HOST_DEVICE inline typename FormatTraits<F>::code_t encode(float x, float scale) {
  using code_t = typename FormatTraits<F>::code_t;
  // A NaN scale (non-finite group) makes x / scale NaN, which clamp_to_qmax
  // passes through; such groups store zero codes, and every format encodes 0.0
  // as code 0. Sanitizing the input (rather than branching) keeps loops
  // branch-free and the int conversion below defined.
  float q = clamp_to_qmax<F>(x / scale);
  q = q == q ? q : 0.0f;
  code_t code;
  if constexpr (F == QuantFormat::kFp8E4M3) {
    code = fp8_e4m3_from_clamped(q);
  } else if constexpr (F == QuantFormat::kFp8E5M2) {
    code = fp8_e5m2_from_clamped(q);
  } else {
    code = static_cast<code_t>(static_cast<int32_t>(round_half_even_small(q)));
  }
  return code;
}

template <QuantFormat F>
C10_HOST_DEVICE inline float decode(typename FormatTraits<F>::code_t code) {
  if constexpr (F == QuantFormat::kFp8E4M3) {
    return c10::detail::fp8e4m3fn_to_fp32_value(code);
  } else if constexpr (F == QuantFormat::kFp8E5M2) {
    return c10::detail::fp8e5m2_to_fp32_value(code);
  } else {
    return static_cast<float>(code);
  }
}

template <QuantFormat F>
C10_HOST_DEVICE inline float dequantize_value(typename FormatTraits<F>::code_t code,
                                              float scale) {
  return decode<F>(code) * scale;
}

}  // namespace kvcompact

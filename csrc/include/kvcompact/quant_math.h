// Scalar quantization math shared by the CPU loops and the CUDA kernels.
//
// This header is the single source of truth for the bit-exact contract in
// DESIGN.md; kvcompact/reference.py restates it in plain torch. Everything here
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

#include <cmath>
#include <cstdint>
#include <limits>

namespace kvcompact {

// Values are part of the op schema's contract with Python (the `fmt` string is
// parsed into this enum in checks.h); do not renumber.
enum class QuantFormat : int { kFp8E4M3 = 0, kFp8E5M2 = 1, kInt8 = 2 };

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

// The running reduction of a group: max |x| and whether any element was NaN/Inf.
struct GroupStats {
  float absmax = 0.0f;
  bool nonfinite = false;

  C10_HOST_DEVICE inline void add(float v) {
    const float a = v < 0.0f ? -v : v;  // |v| without fabsf so -0 -> +0 both ways
    absmax = a > absmax ? a : absmax;   // NaN compares false: tracked below
    nonfinite = nonfinite || !is_finite(v);
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

// One element's code. `scale` is the group's scale from group_scale(); a NaN
// scale marks a non-finite group, whose codes are all zero.
template <QuantFormat F>
C10_HOST_DEVICE inline typename FormatTraits<F>::code_t encode(float x, float scale) {
  using code_t = typename FormatTraits<F>::code_t;
  if (!is_finite(scale)) {
    return code_t(0);
  }
  const float q = clamp_to_qmax<F>(x / scale);
  if constexpr (F == QuantFormat::kFp8E4M3) {
    return c10::detail::fp8e4m3fn_from_fp32_value(q);
  } else if constexpr (F == QuantFormat::kFp8E5M2) {
    return c10::detail::fp8e5m2_from_fp32_value(q);
  } else {
    // rintf rounds half to even in the default rounding mode on host and device.
    return static_cast<code_t>(rintf(q));
  }
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

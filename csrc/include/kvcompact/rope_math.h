// RoPE re-rotation math shared by the CPU loops and the CUDA kernels.
//
// A key rotated at position p and then by delta equals the key rotated at
// p + delta (rotations compose), so moving cached keys to new positions is one
// rotation by delta * inv_freq[i] per pair i. The pairs:
//   neox (rotate-half, Llama/Qwen/Mistral): (i, i + R/2)
//   gptj (interleaved, GPT-J/ChatGLM):      (2i, 2i + 1)
// for i < R/2, R = 2 * len(inv_freq) <= D; dims from R on are untouched.
//
// Angles: delta * inv_freq in fp64 (delta exact up to 2^53, inv_freq an fp32
// value), cos/sin in fp64, each rounded once to fp32. The rotation itself is
// fp32 with every product and sum rounded separately (never fused), which is
// what torch eager computes for `x1 * c - x2 * s`; kvcompact/reference.py's
// rope_shift states the same arithmetic, so fp32 results agree bit for bit
// (up to the last-bit behaviour of the platform's fp64 cos/sin, which survives
// the rounding to fp32 only near a rounding tie).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace kvcompact {

// Values are parsed from the `style` string in rope_args.h.
enum class RopeStyle : int { kNeox = 0, kGptj = 1 };

// Element indices (along D) of rotary pair i; `half` = R / 2.
C10_HOST_DEVICE inline void rope_pair(RopeStyle style, int64_t half, int64_t i, int64_t& a,
                                      int64_t& b) {
  if (style == RopeStyle::kNeox) {
    a = i;
    b = i + half;
  } else {
    a = 2 * i;
    b = 2 * i + 1;
  }
}

C10_HOST_DEVICE inline void rope_cos_sin(int64_t delta, float inv_freq, float& c, float& s) {
  const double angle = static_cast<double>(delta) * static_cast<double>(inv_freq);
  c = static_cast<float>(::cos(angle));
  s = static_cast<float>(::sin(angle));
}

// Separately rounded fp32 products and sums: nvcc contracts `a * b - c * d`
// into FMAs by default, which would make CUDA differ from the CPU and from the
// torch reference in the last bit; the _rn intrinsics are never contracted.
// (Host code is built with -ffp-contract=off for the same reason.)
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// (x1, x2) rotated by the angle whose cos/sin are (c, s):
//   y1 = x1 c - x2 s,  y2 = x2 c + x1 s
// (transformers' `x * cos + rotate_half(x) * sin`, term for term).
C10_HOST_DEVICE inline void rope_rotate(float x1, float x2, float c, float s, float& y1,
                                        float& y2) {
  y1 = sub_rn(mul_rn(x1, c), mul_rn(x2, s));
  y2 = add_rn(mul_rn(x2, c), mul_rn(x1, s));
}

}  // namespace kvcompact

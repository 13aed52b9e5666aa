// Lane loops for the CPU kernels: fixed-width element-wise code the compiler
// turns into SIMD, with no fast-math needed.
//
// A float reduction (sum, max) vectorizes only if the compiler may reorder it,
// which IEEE rules forbid without -ffast-math. Writing it as kLanes independent
// accumulators (lane l sums elements l, l + kLanes, ...) makes every step an
// element-wise vector op, so it vectorizes at any -O level; the final tree over
// the lanes is fixed, so results do not depend on the ISA the code runs on.
//
// Every function is force-inlined: the kernels that use them are compiled
// several times under `__attribute__((target(...)))` (see isa.h), and an
// inlined body takes the caller's ISA while an out-of-line one would not.
#pragma once

#include <c10/util/floating_point_utils.h>

#include <cstdint>
#include <cstring>

#define KVC_INLINE inline __attribute__((always_inline))

namespace kvcompact {
namespace cpu {

constexpr int kLanes = 16;  // one AVX-512 register of fp32, two of AVX2

// Bit casts: c10's, the ones quant_math.h uses.
using c10::detail::fp32_from_bits;
using c10::detail::fp32_to_bits;

// Sum of kLanes partial sums, as a fixed tree (8 + 8, 4 + 4, ...).
KVC_INLINE float reduce_lanes(float (&acc)[kLanes]) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// ---- 16-float vectors (GCC/Clang vector extensions) -------------------------
// One type, compiled to one zmm under AVX-512, two ymm under AVX2, four xmm
// otherwise: explicit SIMD for the hot loops without writing intrinsics per ISA.
// Loads and stores go through memcpy, so no alignment is assumed.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));

KVC_INLINE vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

KVC_INLINE void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

KVC_INLINE vf16 splat16(float x) { return vf16{} + x; }

// Sum of the 16 lanes as a fixed tree (halves, then quarters, ...).
KVC_INLINE float hsum16(vf16 v) {
  typedef float vf8 __attribute__((vector_size(32)));
  typedef float vf4 __attribute__((vector_size(16)));
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Lane j of the result = the sum of the 16 lanes of a[j]: 16 horizontal sums (the dot products of
// one query with 16 keys) in 15 two-vector steps of two shuffles and an add, instead of 16
// separate reductions. Each step halves the partial sums per key and doubles the keys per vector:
// 16 keys x 16 partials -> 8 vectors of 2 keys x 8 -> 4 of 4 x 4 -> 2 of 8 x 2 -> 1 of 16 x 1.
KVC_INLINE vf16 hsum16x16(const vf16 (&a)[16]) {
  vf16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  }
  for (int i = 0; i < 4; ++i) {
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Lane-wise max that propagates NaN from either side (a softmax over a NaN score is NaN).
KVC_INLINE vf16 max16_nan(vf16 a, vf16 b) { return (a > b) | (a != a) ? a : b; }

// The max of the 16 lanes (NaN if any lane is), as a tree of vector maxes: a scalar loop over the
// lanes compiles to data-dependent branches that mispredict on random scores.
KVC_INLINE float hmax16_nan(vf16 v) {
  typedef float vf8 __attribute__((vector_size(32)));
  typedef float vf4 __attribute__((vector_size(16)));
  const vf8 lo8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vf8 hi8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf8 a = (lo8 > hi8) | (lo8 != lo8) ? lo8 : hi8;
  const vf4 lo4 = __builtin_shufflevector(a, a, 0, 1, 2, 3), hi4 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  vf4 b = (lo4 > hi4) | (lo4 != lo4) ? lo4 : hi4;
  const vf4 c = __builtin_shufflevector(b, b, 2, 3, 0, 1);
  b = (b > c) | (b != b) ? b : c;
  const vf4 d = __builtin_shufflevector(b, b, 1, 0, 3, 2);
  b = (b > d) | (b != b) ? b : d;
  return b[0];
}

// 16 storage elements to fp32, exact: the vector forms of quant_math.h's decode<F> (and of c10's
// fp16/bf16 conversions), checked against them for every 8-bit code by the tests.
KVC_INLINE vf16 bits16(vu16 b) {
  vf16 f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// 16 narrow elements widened to 32-bit lanes. Written element by element: GCC
// turns this into pmovzx/pmovsx, while __builtin_convertvector from a 16-byte
// vector became 16 scalar inserts.
KVC_INLINE vu16 widen16_u8(const uint8_t* p) {
  vu16 c;
  for (int l = 0; l < 16; ++l) c[l] = p[l];
  return c;
}

KVC_INLINE vu16 widen16_u16(const uint16_t* p) {
  vu16 c;
  for (int l = 0; l < 16; ++l) c[l] = p[l];
  return c;
}

KVC_INLINE vf16 decode16_e4m3(const uint8_t* p) {
  const vu16 c = widen16_u8(p);
  const vu16 sign = (c & 0x80u) << 24;
  const vu16 e = (c >> 3) & 0xFu;
  const vu16 m = c & 0x7u;
  const vf16 normal = bits16(sign | ((e + 120u) << 23) | (m << 20));
  vf16 sub = __builtin_convertvector(m, vf16) * 0x1p-9f;
  sub = sign != 0u ? -sub : sub;
  const vf16 nan = bits16(sign | 0x7FC00000u);
  const vf16 v = e != 0u ? normal : sub;
  return (c & 0x7Fu) == 0x7Fu ? nan : v;
}

KVC_INLINE vf16 decode16_e5m2(const uint8_t* p) {
  const vu16 c = widen16_u8(p);
  const vu16 sign = (c & 0x80u) << 24;
  const vu16 e = (c >> 2) & 0x1Fu;
  const vu16 m = c & 0x3u;
  const vf16 normal = bits16(sign | ((e + 112u) << 23) | (m << 21));
  vf16 sub = __builtin_convertvector(m, vf16) * 0x1p-16f;
  sub = sign != 0u ? -sub : sub;
  const vf16 special = bits16(sign | 0x7F800000u | (m << 21));
  return e == 0x1Fu ? special : (e != 0u ? normal : sub);
}

KVC_INLINE vf16 decode16_int8(const uint8_t* p) {
  vi16 c;
  for (int l = 0; l < 16; ++l) c[l] = static_cast<int8_t>(p[l]);
  return __builtin_convertvector(c, vf16);
}

KVC_INLINE vf16 decode16_bf16(const uint16_t* p) {
  return bits16(widen16_u16(p) << 16);
}

KVC_INLINE vf16 decode16_f16(const uint16_t* p) {
  const vu16 c = widen16_u16(p);
  const vu16 sign = (c & 0x8000u) << 16;
  const vu16 e = (c >> 10) & 0x1Fu;
  const vu16 m = c & 0x3FFu;
  const vf16 normal = bits16(sign | ((e + 112u) << 23) | (m << 13));
  vf16 sub = __builtin_convertvector(m, vf16) * 0x1p-24f;
  sub = sign != 0u ? -sub : sub;
  const vf16 special = bits16(sign | 0x7F800000u | (m << 13));
  return e == 0x1Fu ? special : (e != 0u ? normal : sub);
}

// sum_i a[i] * b[i].
KVC_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return reduce_lanes(acc) + tail;
}

// y[i] += a * x[i].
KVC_INLINE void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y[i] *= a.
KVC_INLINE void scale_inplace(float a, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// e^r for |r| <= ln2 / 2: a degree-6 polynomial, on a float or on 16 lanes (vf16).
template <class T>
KVC_INLINE T exp_reduced(T r) {
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(x) for x <= 0 (softmax weights after subtracting the running max), to
// ~2 ulp, branch-free so a lane loop over it vectorizes: x = n ln2 + r with
// |r| <= ln2 / 2, a degree-6 polynomial for e^r, and 2^n built in the exponent
// bits. Inputs below -87.3 give 0 (e^x underflows fp32's normal range there;
// softmax weights that small do not change a float32 sum); -inf gives 0; NaN
// gives NaN.
KVC_INLINE float exp_nonpositive(float x) {
  const float nan_in = x;  // kept to propagate NaN
  const bool tiny = !(x > -87.3f);
  const float xc = tiny ? -87.3f : x;
  const float n = __builtin_floorf(xc * 1.44269504f + 0.5f);
  float r = xc - n * 0.693359375f;   // ln2 split in two for an exact first product
  r = r - n * -2.12194440e-4f;
  const float p = exp_reduced(r);
  const int32_t ni = static_cast<int32_t>(n);
  const float two_n = fp32_from_bits(static_cast<uint32_t>(ni + 127) << 23);
  const float y = p * two_n;
  return nan_in != nan_in ? nan_in : (tiny ? 0.0f : y);
}

// exp_nonpositive on 16 lanes, written as vector operations so that it does not depend on the
// compiler vectorizing a loop: the same reduction and polynomial, with n = round(x / ln2) taken by
// adding and subtracting 1.5 * 2^23 (round to nearest even; |r| <= ln2 / 2 either way).
KVC_INLINE vf16 exp16_nonpositive(vf16 x) {
  const vi16 nan_in = x != x;
  const vi16 tiny = ~(x > -87.3f);  // also NaN and -inf
  const vf16 xc = tiny ? splat16(-87.3f) : x;
  const vf16 shifter = splat16(12582912.0f);  // 1.5 * 2^23
  const vf16 n = (xc * 1.44269504f + shifter) - shifter;
  vf16 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const vf16 p = exp_reduced(r);
  const vi16 biased = __builtin_convertvector(n, vi16) + 127;  // n in [-126, 0]: positive
  const vu16 two_n_bits = (vu16)biased << 23;  // a vector cast: the same bits
  const vf16 y = p * bits16(two_n_bits);
  return nan_in ? x : (tiny ? splat16(0.0f) : y);
}

}  // namespace cpu
}  // namespace kvcompact

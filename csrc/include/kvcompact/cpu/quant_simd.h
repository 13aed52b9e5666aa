// x86 SIMD forms of quant_math.h's per-element math, for the CPU quantize /
// dequantize loops (csrc/cpu/quantize_cpu.cpp).
//
// quant_math.h stays the definition: each lane performs the same IEEE
// operations as the scalar function it mirrors (named in the comments), so its
// result is bit-identical. Where the form differs, it is exact by construction,
// and each such piece was checked exhaustively against the scalar form (all
// 2^32 fp32 inputs for the encoders, group_scale and the bf16 / fp16
// rounding; all 256 codes for the decoders):
//   * bf16 -> fp32 is a 16-bit shift (bf16 groups of 32k elements load as
//     zero-interleaved pairs, whose lane order the code packs undo);
//     fp16 -> fp32 is vcvtph2ps.
//   * fp8 e5m2 -> fp32: the code is the high byte of an fp16 (vcvtph2ps).
//     fp8 e4m3fn -> fp32: ((c & 0x7F) << 7 | (c & 0x80) << 8) read as fp16 is
//     the value / 256, exactly; the two NaN codes (c & 0x7F == 0x7F) are
//     patched to decode<F>'s NaN bits. Dequantize folds the * 256 into the
//     scale when 256 * scale is exact (the product is then rounded once, as in
//     decode(c) * scale).
//   * fp32 -> bf16 is c10's round_to_nearest_even written with integer lanes
//     (NaN -> 0x7FC0); fp32 -> fp16 is vcvtps2ph with round-to-nearest-even,
//     NaN lanes patched to c10's 0x7E00 | sign.
//   * the group max is an unsigned max over abs_bits (as in quant_math.h);
//     several groups' maxima are reduced together and their scales computed
//     as a vector (group_scale_from_bits: group_scale's selects, same order).
//   * a group holding NaN / Inf gets scale NaN and all-zero codes, which is
//     what encode<F> gives for every element under a NaN scale; every other
//     group's x / scale is never NaN, so encode's NaN -> 0 step is skipped.
//   * in the AVX-512 blocks, fp8 codes come from |x| / scale (== |x / scale|
//     exactly: IEEE division is sign-symmetric and scale > 0), clamped to
//     QMAX, plus 0x80 for negative x (-0.0 included), as fp8_from_clamped
//     splits sign and magnitude.
//   * division (vdivps is correctly rounded, like divss), the clamp (min/max
//     with the NaN-propagating operand order), the fp8 rounding and the int8
//     round-half-even adds are the same IEEE / integer operations.
//
// Every function is compiled for its ISA through a target attribute, so the
// rest of the build keeps the baseline x86-64 flags; cpu::cpu_isa() (cpu/isa.h,
// shared with the other CPU kernels) picks the level at run time from the CPU
// and KVCOMPACT_CPU_ISA=avx512|avx2|scalar|auto. The target attributes here
// name only what the code uses (no FMA: nothing may be contracted).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>

#include "kvcompact/cpu/isa.h"
#include "kvcompact/quant_math.h"

// The SIMD kernels exist where cpu/isa.h can select them (x86-64 with GCC or
// Clang); elsewhere cpu::cpu_isa() is always kGeneric and the scalar loops run.
#if KVC_HAS_X86_ISAS
#define KVCOMPACT_X86_SIMD 1
#include <immintrin.h>
#else
#define KVCOMPACT_X86_SIMD 0
#endif

namespace kvcompact {
namespace cpu {

// Constants of a format's decode that are not plain conversions: the bits of
// decode<F> for the e4m3fn NaN codes 0x7F and 0xFF.
struct DecodeConsts {
  uint32_t nan_pos_bits = 0;
  uint32_t nan_neg_bits = 0;
};

template <QuantFormat F>
inline DecodeConsts decode_consts() {
  DecodeConsts k;
  if constexpr (F == QuantFormat::kFp8E4M3) {
    k.nan_pos_bits = c10::detail::fp32_to_bits(decode<F>(0x7F));
    k.nan_neg_bits = c10::detail::fp32_to_bits(decode<F>(0xFF));
  }
  return k;
}

#if KVCOMPACT_X86_SIMD

// GCC 12's intrinsic headers start many AVX-512 conversions from a
// self-initialized "undefined" vector, which -Wall reports as uninitialized
// once inlined (GCC bug 105593, fixed in 12.3 / 13); the values are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define KVCOMPACT_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define KVCOMPACT_AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline
#define KVCOMPACT_AVX2 __attribute__((target("avx2,f16c")))
#define KVCOMPACT_AVX2_INLINE __attribute__((target("avx2,f16c"), always_inline)) inline

// e4m3fn dequantize multiplies decode(c) / 256 (an exact fp16 value) by
// scale * 256 instead of decode(c) by scale: the same exact product, rounded
// once, whenever 256 * scale is exact, i.e. |scale| <= kFoldMax (a
// power-of-two multiple that cannot overflow) or scale is NaN (NaN * 256 is
// the same NaN).
constexpr float kFoldMax = std::numeric_limits<float>::max() / 256.0f;
inline bool fold_scale_256(float scale) { return !(std::fabs(scale) > kFoldMax); }

// ---------------------------------------------------------------- AVX-512 (16 lanes)
namespace avx512 {

// Loads `mask`ed lanes of 16 consecutive elements as fp32 (other lanes 0.0).
KVCOMPACT_AVX512_INLINE __m512 load(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
KVCOMPACT_AVX512_INLINE __m512 load(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
KVCOMPACT_AVX512_INLINE __m512 load(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// Stores `mask`ed lanes rounded to T exactly as static_cast<T>(float) does.
KVCOMPACT_AVX512_INLINE void store(float* p, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, v);
}
KVCOMPACT_AVX512_INLINE void store(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // c10::detail::round_to_nearest_even: (u + ((u >> 16) & 1) + 0x7FFF) >> 16; NaN -> 0x7FC0.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(
      _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (nan != 0) r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
KVCOMPACT_AVX512_INLINE void store(c10::Half* p, __m512 v, __mmask16 m) {
  // c10::detail::fp16_ieee_from_fp32_value: round to nearest even (what
  // vcvtps2ph does for every non-NaN input); NaN -> sign | 0x7E00.
  __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (nan != 0) {
    const __m512i nan_bits = _mm512_or_si512(
        _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000)),
        _mm512_set1_epi32(0x7E00));
    h = _mm256_mask_blend_epi16(nan, h, _mm512_cvtepi32_epi16(nan_bits));
  }
  _mm256_mask_storeu_epi16(p, m, h);
}

// abs_bits() of each lane.
KVCOMPACT_AVX512_INLINE __m512i abs_bits(__m512 v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
}

// fp8_from_clamped<...> per lane for a non-negative clamped q, given as bits
// (its magnitude): the same integer and float operations as the scalar form,
// which splits q into sign and magnitude first. Codes come out in 0..127.
template <int kMantBits, int kBias, uint32_t kMinNormalBits, uint32_t kDenormMaskBits>
KVCOMPACT_AVX512_INLINE __m512i fp8_code_of_mag(__m512i mag) {
  const __m512i magic = _mm512_set1_epi32(static_cast<int>(kDenormMaskBits));
  const __m512i sub = _mm512_sub_epi32(
      _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(mag), _mm512_castsi512_ps(magic))), magic);
  constexpr int kShift = 23 - kMantBits;
  const __m512i mant_odd = _mm512_and_si512(_mm512_srli_epi32(mag, kShift), _mm512_set1_epi32(1));
  // mag + ((kBias - 127) << 23) + (2^(kShift-1) - 1) + mant_odd, modulo 2^32 as in the scalar form.
  constexpr uint32_t kAdd = (static_cast<uint32_t>(kBias - 127) << 23) + ((1u << (kShift - 1)) - 1u);
  const __m512i norm = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(mag, _mm512_set1_epi32(static_cast<int>(kAdd))), mant_odd),
      kShift);
  const __mmask16 is_sub =
      _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(static_cast<int>(kMinNormalBits)));
  return _mm512_mask_blend_epi32(is_sub, norm, sub);
}

template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512i fp8_code_of_mag(__m512i mag) {
  if constexpr (F == QuantFormat::kFp8E4M3) {
    return fp8_code_of_mag<3, 7, (121u << 23), (141u << 23)>(mag);
  } else {
    return fp8_code_of_mag<2, 15, (113u << 23), (134u << 23)>(mag);
  }
}

// The same with q's sign put back: code | ((q >> 24) & 0x80), in one
// ternary-logic op (truth table A | (B & C) = 0xF8). Codes in 0..255.
template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512i fp8_code_of_clamped(__m512i mag, __m512 q) {
  return _mm512_ternarylogic_epi32(fp8_code_of_mag<F>(mag), _mm512_srli_epi32(_mm512_castps_si512(q), 24),
                                   _mm512_set1_epi32(0x80), 0xF8);
}

// clamp_to_qmax + the format's conversion, for lanes that are not NaN.
template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512i convert_clamped(__m512 q) {
  constexpr float qmax = FormatTraits<F>::kQmax;
  if constexpr (F == QuantFormat::kInt8) {
    // clamp_to_qmax: min(a, b) is (a < b ? a : b), so a NaN q would pass through both.
    q = _mm512_min_ps(_mm512_set1_ps(qmax), q);
    q = _mm512_max_ps(_mm512_set1_ps(-qmax), q);
    const __m512 magic = _mm512_set1_ps(12582912.0f);  // round_half_even_small
    return _mm512_cvttps_epi32(_mm512_sub_ps(_mm512_add_ps(q, magic), magic));
  } else {
    // For non-NaN q, |clamp_to_qmax(q)| == min(|q|, QMAX), and the sign is q's.
    const __m512i mag = _mm512_castps_si512(_mm512_min_ps(
        _mm512_set1_ps(qmax), _mm512_castsi512_ps(abs_bits(q))));
    return fp8_code_of_clamped<F>(mag, q);
  }
}

// encode<F>(x, scale) per lane for a finite group (x not NaN, scale finite and
// > 0, so x / scale is never NaN and encode's NaN -> 0 step is the identity);
// the code is in each lane's low byte. Non-finite groups never get here: their
// codes are all 0 (encode's result for a NaN scale) and are written as such.
template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512i encode_finite(__m512 x, __m512 scale) {
  return convert_clamped<F>(_mm512_div_ps(x, scale));
}

// For fp8 formats in a finite group, the code without its sign bit from |x|:
// with scale > 0, |x| / scale == |x / scale| exactly (division rounds
// symmetrically), so min(QMAX, |x| / scale) is |clamp_to_qmax(x / scale)|;
// the caller adds 0x80 to the codes of negative x (x / scale has x's sign,
// -0.0 included). Codes in 0..127.
template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512i encode_finite_mag(__m512 abs_x, __m512 scale) {
  const __m512 mag = _mm512_min_ps(_mm512_set1_ps(FormatTraits<F>::kQmax), _mm512_div_ps(abs_x, scale));
  return fp8_code_of_mag<F>(_mm512_castps_si512(mag));
}

// encode<F>(x, scale) per lane for any x and scale (NaN included).
template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512i encode(__m512 x, __m512 scale) {
  __m512 q = _mm512_div_ps(x, scale);
  q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(q, q, _CMP_EQ_OQ), q);  // NaN -> 0.0f
  return convert_clamped<F>(q);
}

// group_scale(GroupStats::from_max_abs_bits(b), QMAX) per lane, the scalar
// function's selects in the same order.
template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512 group_scale_from_bits(__m512i b) {
  const __m512 absmax = _mm512_castsi512_ps(b);
  __m512 s = _mm512_div_ps(absmax, _mm512_set1_ps(FormatTraits<F>::kQmax));
  const __m512 min_scale = _mm512_set1_ps(kMinScale);
  s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, min_scale, _CMP_LT_OQ), s, min_scale);
  s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(absmax, _mm512_setzero_ps(), _CMP_EQ_OQ), s,
                           _mm512_set1_ps(1.0f));
  const __mmask16 nonfinite = _mm512_cmpge_epu32_mask(b, _mm512_set1_epi32(static_cast<int>(kInfBits)));
  return _mm512_mask_blend_ps(nonfinite, s, _mm512_set1_ps(quiet_nan()));
}

// Reductions of several groups' maxima at once. max_lanes4 folds the four
// 128-bit lanes of each of m0..m3 together: lane i of the result holds m_i's
// partial maxima. k16 treats the lanes as u16 (bf16 abs bits), else u32.
template <bool k16>
KVCOMPACT_AVX512_INLINE __m512i max_u(__m512i a, __m512i b) {
  if constexpr (k16) {
    return _mm512_max_epu16(a, b);
  } else {
    return _mm512_max_epu32(a, b);
  }
}

template <bool k16>
KVCOMPACT_AVX512_INLINE __m512i max_lanes4(__m512i m0, __m512i m1, __m512i m2, __m512i m3) {
  // [m0.l0 m0.l1 m1.l0 m1.l1] vs [m0.l2 m0.l3 m1.l2 m1.l3] (128-bit lanes l).
  const __m512i a = max_u<k16>(_mm512_shuffle_i64x2(m0, m1, 0x44), _mm512_shuffle_i64x2(m0, m1, 0xEE));
  const __m512i b = max_u<k16>(_mm512_shuffle_i64x2(m2, m3, 0x44), _mm512_shuffle_i64x2(m2, m3, 0xEE));
  // [a.l0 a.l2 b.l0 b.l2] vs [a.l1 a.l3 b.l1 b.l3].
  return max_u<k16>(_mm512_shuffle_i64x2(a, b, 0x88), _mm512_shuffle_i64x2(a, b, 0xDD));
}

// u16 maxima of bf16 abs bits -> the fp32 abs bits of the larger of each
// 32-bit lane's two halves (bf16 -> fp32 is a 16-bit shift).
KVCOMPACT_AVX512_INLINE __m512i widen_max16(__m512i m) {
  return _mm512_slli_epi32(_mm512_max_epu16(m, _mm512_srli_epi32(m, 16)), 16);
}

// In-lane end of the reduction: lane i of c (u32) -> lanes 4i..4i+3 all hold its max.
KVCOMPACT_AVX512_INLINE __m512i finish_max4(__m512i c) {
  c = _mm512_max_epu32(c, _mm512_shuffle_epi32(c, _MM_PERM_BADC));
  return _mm512_max_epu32(c, _mm512_shuffle_epi32(c, _MM_PERM_CDAB));
}

// Same for two such vectors: lane 4i holds c0 lane i's max, lane 4i + 1 c1's.
KVCOMPACT_AVX512_INLINE __m512i finish_max8(__m512i c0, __m512i c1) {
  const __m512i d = _mm512_max_epu32(_mm512_unpacklo_epi32(c0, c1), _mm512_unpackhi_epi32(c0, c1));
  return _mm512_max_epu32(d, _mm512_shuffle_epi32(d, _MM_PERM_BADC));
}

// The lane holding group b's max (and then its scale) among B groups reduced
// by finish_max4 (B <= 4) or finish_max8 (B == 8).
constexpr int group_lane(int b, int B) { return B == 8 ? (b < 4 ? 4 * b : 4 * (b - 4) + 1) : 4 * b; }

// Narrows four vectors of codes (int32 lanes) to 64 code bytes. `idx` undoes
// the lane interleaving of the two in-lane packs (and, for bf16 pairs, the
// interleaving of their widening).
template <QuantFormat F>
KVCOMPACT_AVX512_INLINE __m512i pack_codes64(__m512i c0, __m512i c1, __m512i c2, __m512i c3, __m512i idx) {
  // Codes are 0..255 (fp8) or -127..127 (int8) in int32 lanes, so both
  // saturating packs are plain narrowings.
  const __m512i w0 = _mm512_packs_epi32(c0, c1);
  const __m512i w1 = _mm512_packs_epi32(c2, c3);
  __m512i b;
  if constexpr (F == QuantFormat::kInt8) {
    b = _mm512_packs_epi16(w0, w1);
  } else {
    b = _mm512_packus_epi16(w0, w1);
  }
  return _mm512_permutexvar_epi32(idx, b);
}

// Dword order after pack_codes64's packs, for c0..c3 holding elements
// [0,16), [16,32), [32,48), [48,64) in order: lane k of the packed vector holds
// dwords (c0.k, c1.k, c2.k, c3.k).
KVCOMPACT_AVX512_INLINE __m512i natural_order_idx() {
  return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}

// Same for bf16 pairs (quantize_block): 32 bf16 widened to fp32 by
// interleaving with zeros within 128-bit lanes (one op per 16 elements), so
// c0 holds elements 8k..8k+3 of each lane k of [0,32) and c1 elements
// 8k+4..8k+7, c2/c3 likewise for [32,64). The in-lane packs restore the order
// inside each 32, leaving lane k of the packed vector with elements 8k..8k+7
// of the first 32, then 8k..8k+7 of the second.
KVCOMPACT_AVX512_INLINE __m512i pair_order_idx() {
  return _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
}

KVCOMPACT_AVX512_INLINE __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Any group size: a masked loop per group (two passes over the group, the
// second from L1), the scale from quant_math.h's scalar group_scale.
template <QuantFormat F, typename T>
KVCOMPACT_AVX512_INLINE void quantize_group(const T* xg, typename FormatTraits<F>::code_t* cg,
                                            float* scale_out, int64_t G) {
  constexpr __mmask16 kAll = 0xFFFF;
  const int64_t full = G & ~int64_t{15};
  const __mmask16 tail = tail_mask(G - full);
  // The group's max over abs_bits (masked-off lanes load 0.0, the neutral element).
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = 0; i < full; i += 16) m = _mm512_max_epu32(m, abs_bits(load(xg + i, kAll)));
  if (tail) m = _mm512_max_epu32(m, abs_bits(load(xg + full, tail)));
  const uint32_t max_bits = _mm512_reduce_max_epu32(m);
  const float scale = group_scale(GroupStats::from_max_abs_bits(max_bits), FormatTraits<F>::kQmax);
  *scale_out = scale;
  if (max_bits >= kInfBits) {  // non-finite group: scale NaN, every code 0
    std::memset(cg, 0, static_cast<size_t>(G));
    return;
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < full; i += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(cg + i),
                     _mm512_cvtepi32_epi8(encode_finite<F>(load(xg + i, kAll), vs)));
  }
  if (tail) {
    _mm_mask_storeu_epi8(cg + full, tail, _mm512_cvtepi32_epi8(encode_finite<F>(load(xg + full, tail), vs)));
  }
}

// One row: `groups` groups of G contiguous elements of x -> codes (contiguous)
// and one scale per group (at scales[g * scale_stride]).
template <QuantFormat F, typename T>
KVCOMPACT_AVX512 void quantize_row(const T* x, typename FormatTraits<F>::code_t* codes,
                                   float* scales, int64_t scale_stride, int64_t groups,
                                   int64_t G) {
  for (int64_t g = 0; g < groups; ++g) {
    quantize_group<F>(x + g * G, codes + g * G, scales + g * scale_stride, G);
  }
}

// B consecutive groups of 16 * NV elements (B * NV a multiple of 4), kept in
// registers between the max and the encode. With B > 1 the B maxima are
// reduced together, their scales computed in one vector (group_scale_from_bits)
// and stored with one masked store (so `scales` must be contiguous); with
// B == 1 the scalar group_scale runs. bf16 groups of 32k elements are loaded
// raw: the max runs on u16 abs bits and the values are widened in pairs (see
// pair_order_idx). fp8 codes are computed from |x| (encode_finite_mag, reusing
// the abs taken for the max) and get their sign bit from a mask of x's signs
// on the packed bytes.
template <QuantFormat F, typename T, int NV, int B>
KVCOMPACT_AVX512_INLINE void quantize_block(const T* x, typename FormatTraits<F>::code_t* codes,
                                            float* scales) {
  static_assert((NV * B) % 4 == 0 && (B == 1 || B == 2 || B == 4 || B == 8), "quantize_block: bad shape");
  constexpr int V = NV * B;
  constexpr bool kPairs = std::is_same_v<T, c10::BFloat16> && NV % 2 == 0;
  constexpr bool kFp8 = F != QuantFormat::kInt8;
  constexpr int kLoads = kPairs ? V / 2 : V;  // 64-byte loads
  constexpr int kLoadsPerGroup = kLoads / B;
  // Pairs: raw bf16 and their u16 abs bits. Otherwise: fp32 values and abs bits.
  __m512i raw[kPairs ? kLoads : 1], raw_abs[kPairs ? kLoads : 1];
  __m512 v[kPairs ? 1 : V];
  __m512i v_abs[kPairs ? 1 : V];
  __m512i m[B];
  if constexpr (kPairs) {
    const __m512i abs16 = _mm512_set1_epi16(0x7FFF);
#pragma GCC unroll 16
    for (int j = 0; j < kLoads; ++j) {
      raw[j] = _mm512_loadu_si512(x + 32 * j);
      raw_abs[j] = _mm512_and_si512(raw[j], abs16);
    }
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
      m[b] = raw_abs[b * kLoadsPerGroup];
#pragma GCC unroll 4
      for (int j = 1; j < kLoadsPerGroup; ++j) m[b] = _mm512_max_epu16(m[b], raw_abs[b * kLoadsPerGroup + j]);
    }
  } else {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) {
      v[j] = load(x + 16 * j, 0xFFFF);
      v_abs[j] = abs_bits(v[j]);
    }
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
      m[b] = v_abs[b * NV];
#pragma GCC unroll 8
      for (int j = 1; j < NV; ++j) m[b] = _mm512_max_epu32(m[b], v_abs[b * NV + j]);
    }
  }
  __m512 vs[B];
  uint32_t nonfinite;  // bit group_lane(b, B) (bit 0 for B == 1): group b holds NaN / Inf
  if constexpr (B == 1) {
    const uint32_t max_bits = _mm512_reduce_max_epu32(kPairs ? widen_max16(m[0]) : m[0]);
    const float scale = group_scale(GroupStats::from_max_abs_bits(max_bits), FormatTraits<F>::kQmax);
    scales[0] = scale;
    vs[0] = _mm512_set1_ps(scale);
    nonfinite = max_bits >= kInfBits;
  } else {
    __m512i r;
    if constexpr (B == 8) {
      __m512i c0 = max_lanes4<kPairs>(m[0], m[1], m[2], m[3]);
      __m512i c1 = max_lanes4<kPairs>(m[4], m[5], m[6], m[7]);
      if constexpr (kPairs) {
        c0 = widen_max16(c0);
        c1 = widen_max16(c1);
      }
      r = finish_max8(c0, c1);
    } else {
      __m512i c = B == 4 ? max_lanes4<kPairs>(m[0], m[1], m[2], m[3])
                         : max_lanes4<kPairs>(m[0], m[1], m[0], m[1]);
      if constexpr (kPairs) c = widen_max16(c);
      r = finish_max4(c);
    }
    const __m512 s = group_scale_from_bits<F>(r);
    const __m512i order = _mm512_setr_epi32(group_lane(0, B), group_lane(1, B), group_lane(2 % B, B),
                                            group_lane(3 % B, B), group_lane(4 % B, B), group_lane(5 % B, B),
                                            group_lane(6 % B, B), group_lane(7 % B, B), 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_mask_storeu_ps(scales, static_cast<__mmask16>((1u << B) - 1u), _mm512_permutexvar_ps(order, s));
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) vs[b] = _mm512_permutexvar_ps(_mm512_set1_epi32(group_lane(b, B)), s);
    nonfinite = _mm512_cmpge_epu32_mask(r, _mm512_set1_epi32(static_cast<int>(kInfBits)));
  }
  // Codes per vector (fp8: without the sign bit), in the order the loads widened them.
  __m512i c[V];
  if constexpr (kPairs) {
    const __m512i zero = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int j = 0; j < kLoads; ++j) {
      const __m512 scale = vs[j / kLoadsPerGroup];
      if constexpr (kFp8) {
        c[2 * j] = encode_finite_mag<F>(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw_abs[j])), scale);
        c[2 * j + 1] = encode_finite_mag<F>(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw_abs[j])), scale);
      } else {
        c[2 * j] = encode_finite<F>(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw[j])), scale);
        c[2 * j + 1] = encode_finite<F>(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw[j])), scale);
      }
    }
  } else {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) {
      if constexpr (kFp8) {
        c[j] = encode_finite_mag<F>(_mm512_castsi512_ps(v_abs[j]), vs[j / NV]);
      } else {
        c[j] = encode_finite<F>(v[j], vs[j / NV]);
      }
    }
  }
  const __m512i idx = kPairs ? pair_order_idx() : natural_order_idx();
#pragma GCC unroll 4
  for (int j = 0; j < V; j += 4) {
    __m512i bytes = pack_codes64<F>(c[j], c[j + 1], c[j + 2], c[j + 3], idx);
    if constexpr (kFp8) {
      // Sign bits of the 64 elements, in memory order.
      __mmask64 neg;
      if constexpr (kPairs) {
        neg = static_cast<__mmask64>(_mm512_movepi16_mask(raw[j / 2])) |
              (static_cast<__mmask64>(_mm512_movepi16_mask(raw[j / 2 + 1])) << 32);
      } else {
        neg = static_cast<__mmask64>(_mm512_movepi32_mask(_mm512_castps_si512(v[j]))) |
              (static_cast<__mmask64>(_mm512_movepi32_mask(_mm512_castps_si512(v[j + 1]))) << 16) |
              (static_cast<__mmask64>(_mm512_movepi32_mask(_mm512_castps_si512(v[j + 2]))) << 32) |
              (static_cast<__mmask64>(_mm512_movepi32_mask(_mm512_castps_si512(v[j + 3]))) << 48);
      }
      bytes = _mm512_mask_add_epi8(bytes, neg, bytes, _mm512_set1_epi8(static_cast<char>(0x80)));
    }
    _mm512_storeu_si512(codes + 16 * j, bytes);
  }
  if (__builtin_expect(nonfinite != 0, 0)) {  // non-finite groups: scale NaN, every code 0
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
      if ((nonfinite >> (B == 1 ? 0 : group_lane(b, B))) & 1u) {
        std::memset(codes + b * 16 * NV, 0, 16 * NV);
      }
    }
  }
}

// A run of `groups` groups of G = 16 * NV contiguous elements (one row, or
// several whole rows of a contiguous tensor) -> contiguous codes and scales
// at scales[g * scale_stride]: blocks of B groups through quantize_block
// (B = 8 / 8 / 4 / 2 for NV = 1 / 2 / 4 / 8, 16 vectors or fewer), then one
// block of B / 2 where it fits, then single groups.
template <QuantFormat F, typename T, int NV>
KVCOMPACT_AVX512 void quantize_row_fixed(const T* x, typename FormatTraits<F>::code_t* codes,
                                         float* scales, int64_t scale_stride, int64_t groups,
                                         int64_t /*G, always 16 * NV*/) {
  constexpr int64_t G = 16 * NV;
  constexpr int B = NV >= 8 ? 2 : (NV >= 4 ? 4 : 8);
  constexpr int B2 = B / 2;
  int64_t g = 0;
  // Blocks of several groups store their scales as one vector: contiguous scales only.
  if (scale_stride == 1) {
    for (; g + B <= groups; g += B) quantize_block<F, T, NV, B>(x + g * G, codes + g * G, scales + g);
    if constexpr (B2 >= 2 && (NV * B2) % 4 == 0) {
      if (g + B2 <= groups) {
        quantize_block<F, T, NV, B2>(x + g * G, codes + g * G, scales + g);
        g += B2;
      }
    }
  }
  for (; g < groups; ++g) {
    if constexpr (NV % 4 == 0) {
      quantize_block<F, T, NV, 1>(x + g * G, codes + g * G, scales + g * scale_stride);
    } else {
      quantize_group<F>(x + g * G, codes + g * G, scales + g * scale_stride, G);
    }
  }
}

// decode<F> of 16 codes, or for e4m3fn with kDiv256 decode<F> / 256 (exact:
// the fp16 value before the final * 256; NaN codes give decode<F>'s NaN).
template <QuantFormat F, bool kDiv256 = false>
KVCOMPACT_AVX512_INLINE __m512 decode(__m128i codes, const DecodeConsts& k) {
  if constexpr (F == QuantFormat::kInt8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
  } else if constexpr (F == QuantFormat::kFp8E5M2) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(codes), 8));
  } else {
    // Sign-extended code << 7 puts the sign in bits 15 and 14 and the low 7
    // bits in 13..7; clearing bit 14 leaves (c & 0x7F) << 7 | (c & 0x80) << 8.
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(codes), 7),
                                       _mm256_set1_epi16(static_cast<short>(0xBF80)));
    __m512 v = _mm512_cvtph_ps(h);
    if constexpr (!kDiv256) v = _mm512_mul_ps(v, _mm512_set1_ps(256.0f));
    // NaN codes: (c | 0x80) == 0xFF.
    const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_or_si128(codes, _mm_set1_epi8(static_cast<char>(0x80))),
                                              _mm_set1_epi8(static_cast<char>(0xFF)));
    if (nan != 0) {
      const __mmask16 neg = _mm_movepi8_mask(codes);
      const __m512i nan_bits = _mm512_mask_blend_epi32(neg, _mm512_set1_epi32(static_cast<int>(k.nan_pos_bits)),
                                                       _mm512_set1_epi32(static_cast<int>(k.nan_neg_bits)));
      v = _mm512_mask_blend_ps(nan, v, _mm512_castsi512_ps(nan_bits));
    }
    return v;
  }
}

// One group of dequantize: y = decode(code) * scale, with vs = scale; or, for
// e4m3fn with kDiv256, y = (decode(code) / 256) * (scale * 256): the same
// exact product, rounded once, when fold_scale_256(scale).
template <QuantFormat F, typename T, bool kDiv256>
KVCOMPACT_AVX512_INLINE void dequantize_group(const typename FormatTraits<F>::code_t* cg, T* yg,
                                              int64_t G, __m512 vs, const DecodeConsts& k) {
  const int64_t full = G & ~int64_t{15};
  for (int64_t i = 0; i < full; i += 16) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cg + i));
    store(yg + i, _mm512_mul_ps(decode<F, kDiv256>(c, k), vs), 0xFFFF);
  }
  if (full < G) {
    const __mmask16 tail = tail_mask(G - full);
    const __m128i c = _mm_maskz_loadu_epi8(tail, cg + full);
    store(yg + full, _mm512_mul_ps(decode<F, kDiv256>(c, k), vs), tail);
  }
}

// One row of dequantize: contiguous codes -> contiguous out.
template <QuantFormat F, typename T>
KVCOMPACT_AVX512 void dequantize_row(const typename FormatTraits<F>::code_t* codes,
                                     const float* scales, int64_t scale_stride, T* out,
                                     int64_t groups, int64_t G, const DecodeConsts& k) {
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = scales[g * scale_stride];
    if constexpr (F == QuantFormat::kFp8E4M3) {
      if (fold_scale_256(scale)) {
        dequantize_group<F, T, true>(codes + g * G, out + g * G, G, _mm512_set1_ps(scale * 256.0f), k);
        continue;
      }
    }
    dequantize_group<F, T, false>(codes + g * G, out + g * G, G, _mm512_set1_ps(scale), k);
  }
}

}  // namespace avx512


// ---------------------------------------------------------------- AVX2 + F16C (8 lanes)
// Full vectors only; the last G % 8 elements of a group take the scalar
// functions of quant_math.h (same math, and no masked byte stores here).
namespace avx2 {

KVCOMPACT_AVX2_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
KVCOMPACT_AVX2_INLINE __m256 load(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
KVCOMPACT_AVX2_INLINE __m256 load(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

KVCOMPACT_AVX2_INLINE void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
KVCOMPACT_AVX2_INLINE void store(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(
      _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
  // Lanes hold 0..0xFFFF, so the unsigned-saturating pack is a plain narrowing.
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
KVCOMPACT_AVX2_INLINE void store(c10::Half* p, __m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256i nan_bits = _mm256_or_si256(
      _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000)),
      _mm256_set1_epi32(0x7E00));
  const __m128i nan_h = _mm_packus_epi32(_mm256_castsi256_si128(nan_bits), _mm256_extracti128_si256(nan_bits, 1));
  const __m256i nan_i = _mm256_castps_si256(nan);
  const __m128i nan_m = _mm_packs_epi32(_mm256_castsi256_si128(nan_i), _mm256_extracti128_si256(nan_i, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blendv_epi8(h, nan_h, nan_m));
}

KVCOMPACT_AVX2_INLINE __m256i abs_bits(__m256 v) {
  return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
}

template <int kMantBits, int kBias, uint32_t kMinNormalBits, uint32_t kDenormMaskBits>
KVCOMPACT_AVX2_INLINE __m256i fp8_from_clamped(__m256 q) {
  const __m256i bits = _mm256_castps_si256(q);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256i mag = _mm256_xor_si256(bits, sign);
  const __m256i magic = _mm256_set1_epi32(static_cast<int>(kDenormMaskBits));
  const __m256i sub = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(mag), _mm256_castsi256_ps(magic))), magic);
  constexpr int kShift = 23 - kMantBits;
  const __m256i mant_odd = _mm256_and_si256(_mm256_srli_epi32(mag, kShift), _mm256_set1_epi32(1));
  constexpr uint32_t kAdd = (static_cast<uint32_t>(kBias - 127) << 23) + ((1u << (kShift - 1)) - 1u);
  const __m256i norm = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(static_cast<int>(kAdd))), mant_odd),
      kShift);
  // mag has its sign bit clear and kMinNormalBits < 2^31, so a signed compare is exact.
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kMinNormalBits)), mag);
  const __m256i code = _mm256_blendv_epi8(norm, sub, is_sub);
  return _mm256_or_si256(code, _mm256_srli_epi32(sign, 24));
}

// Narrows 8 int32 codes (0..255 for fp8, -127..127 for int8: both packs are
// plain narrowings) to 8 code bytes in the low 64 bits.
template <QuantFormat F>
KVCOMPACT_AVX2_INLINE __m128i narrow_codes(__m256i c) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  if constexpr (F == QuantFormat::kInt8) {
    return _mm_packs_epi16(w, w);
  } else {
    return _mm_packus_epi16(w, w);
  }
}

// encode<F> of 8 lanes, narrowed to 8 code bytes (in the low 64 bits).
template <QuantFormat F>
KVCOMPACT_AVX2_INLINE __m128i encode(__m256 x, __m256 scale) {
  const __m256 qmax = _mm256_set1_ps(FormatTraits<F>::kQmax);
  __m256 q = _mm256_div_ps(x, scale);
  q = _mm256_min_ps(qmax, q);
  q = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), qmax), q);
  q = _mm256_and_ps(q, _mm256_cmp_ps(q, q, _CMP_EQ_OQ));  // NaN -> 0.0f
  __m256i c;
  if constexpr (F == QuantFormat::kFp8E4M3) {
    c = fp8_from_clamped<3, 7, (121u << 23), (141u << 23)>(q);
  } else if constexpr (F == QuantFormat::kFp8E5M2) {
    c = fp8_from_clamped<2, 15, (113u << 23), (134u << 23)>(q);
  } else {
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    c = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(q, magic), magic));
  }
  return narrow_codes<F>(c);
}

// encode<F> for a finite group (x not NaN, scale finite and > 0: x / scale is
// never NaN), as avx512::encode_finite: the clamp on |q| (for non-NaN q,
// |clamp_to_qmax(q)| == min(|q|, QMAX)) and fp8_from_clamped's steps on that
// magnitude, q's sign put back as code | ((q >> 24) & 0x80).
template <QuantFormat F>
KVCOMPACT_AVX2_INLINE __m128i encode_finite(__m256 x, __m256 scale) {
  constexpr float qmax = FormatTraits<F>::kQmax;
  const __m256 q = _mm256_div_ps(x, scale);
  if constexpr (F == QuantFormat::kInt8) {
    __m256 t = _mm256_min_ps(_mm256_set1_ps(qmax), q);
    t = _mm256_max_ps(_mm256_set1_ps(-qmax), t);
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    return narrow_codes<F>(_mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(t, magic), magic)));
  } else {
    constexpr int kMantBits = F == QuantFormat::kFp8E4M3 ? 3 : 2;
    constexpr int kBias = F == QuantFormat::kFp8E4M3 ? 7 : 15;
    constexpr uint32_t kMinNormalBits = F == QuantFormat::kFp8E4M3 ? (121u << 23) : (113u << 23);
    constexpr uint32_t kDenormMaskBits = F == QuantFormat::kFp8E4M3 ? (141u << 23) : (134u << 23);
    const __m256i bits = _mm256_castps_si256(q);
    const __m256i mag = _mm256_castps_si256(_mm256_min_ps(
        _mm256_set1_ps(qmax), _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)))));
    const __m256i magic = _mm256_set1_epi32(static_cast<int>(kDenormMaskBits));
    const __m256i sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(mag), _mm256_castsi256_ps(magic))), magic);
    constexpr int kShift = 23 - kMantBits;
    const __m256i mant_odd = _mm256_and_si256(_mm256_srli_epi32(mag, kShift), _mm256_set1_epi32(1));
    constexpr uint32_t kAdd = (static_cast<uint32_t>(kBias - 127) << 23) + ((1u << (kShift - 1)) - 1u);
    const __m256i norm = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(static_cast<int>(kAdd))), mant_odd),
        kShift);
    const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kMinNormalBits)), mag);
    const __m256i code = _mm256_blendv_epi8(norm, sub, is_sub);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
    return narrow_codes<F>(_mm256_or_si256(code, sign));
  }
}

// decode<F> of 8 codes (low 64 bits), or decode<F> / 256 for e4m3fn with
// kDiv256, as avx512::decode.
template <QuantFormat F, bool kDiv256 = false>
KVCOMPACT_AVX2_INLINE __m256 decode(__m128i codes, const DecodeConsts& k) {
  if constexpr (F == QuantFormat::kInt8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
  } else if constexpr (F == QuantFormat::kFp8E5M2) {
    return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(codes), 8));
  } else {
    const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(codes), 7),
                                    _mm_set1_epi16(static_cast<short>(0xBF80)));
    __m256 v = _mm256_cvtph_ps(h);
    if constexpr (!kDiv256) v = _mm256_mul_ps(v, _mm256_set1_ps(256.0f));
    const __m128i nan8 = _mm_cmpeq_epi8(_mm_or_si128(codes, _mm_set1_epi8(static_cast<char>(0x80))),
                                        _mm_set1_epi8(static_cast<char>(0xFF)));
    if ((_mm_movemask_epi8(nan8) & 0xFF) != 0) {
      const __m256i nan = _mm256_cvtepi8_epi32(nan8);
      const __m256i neg = _mm256_cvtepi8_epi32(_mm_cmplt_epi8(codes, _mm_setzero_si128()));
      const __m256i nan_bits = _mm256_blendv_epi8(_mm256_set1_epi32(static_cast<int>(k.nan_pos_bits)),
                                                  _mm256_set1_epi32(static_cast<int>(k.nan_neg_bits)), neg);
      v = _mm256_blendv_ps(v, _mm256_castsi256_ps(nan_bits), _mm256_castsi256_ps(nan));
    }
    return v;
  }
}

template <QuantFormat F, typename T>
KVCOMPACT_AVX2 void quantize_row(const T* x, typename FormatTraits<F>::code_t* codes,
                                 float* scales, int64_t scale_stride, int64_t groups,
                                 int64_t G) {
  const int64_t full = G & ~int64_t{7};
  for (int64_t g = 0; g < groups; ++g) {
    const T* xg = x + g * G;
    auto* cg = codes + g * G;
    __m256i m = _mm256_setzero_si256();
    for (int64_t i = 0; i < full; i += 8) m = _mm256_max_epu32(m, abs_bits(load(xg + i)));
    __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(1, 0, 3, 2)));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(2, 3, 0, 1)));
    uint32_t max_bits = static_cast<uint32_t>(_mm_cvtsi128_si32(m4));
    for (int64_t i = full; i < G; ++i) {
      const uint32_t b = kvcompact::abs_bits(static_cast<float>(xg[i]));
      max_bits = b > max_bits ? b : max_bits;
    }
    const float scale = group_scale(GroupStats::from_max_abs_bits(max_bits), FormatTraits<F>::kQmax);
    scales[g * scale_stride] = scale;
    if (max_bits >= kInfBits) {  // non-finite group: scale NaN, every code 0
      std::memset(cg, 0, static_cast<size_t>(G));
      continue;
    }
    const __m256 vs = _mm256_set1_ps(scale);
    for (int64_t i = 0; i < full; i += 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(cg + i), encode_finite<F>(load(xg + i), vs));
    }
    for (int64_t i = full; i < G; ++i) cg[i] = kvcompact::encode<F>(static_cast<float>(xg[i]), scale);
  }
}

template <QuantFormat F, typename T, bool kDiv256>
KVCOMPACT_AVX2_INLINE void dequantize_group(const typename FormatTraits<F>::code_t* cg, T* yg,
                                            int64_t G, float scale, const DecodeConsts& k) {
  const int64_t full = G & ~int64_t{7};
  const __m256 vs = _mm256_set1_ps(kDiv256 ? scale * 256.0f : scale);
  for (int64_t i = 0; i < full; i += 8) {
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cg + i));
    store(yg + i, _mm256_mul_ps(decode<F, kDiv256>(c, k), vs));
  }
  for (int64_t i = full; i < G; ++i) yg[i] = static_cast<T>(dequantize_value<F>(cg[i], scale));
}

// As avx512::dequantize_row (e4m3fn's * 256 folded into the scale when exact).
template <QuantFormat F, typename T>
KVCOMPACT_AVX2 void dequantize_row(const typename FormatTraits<F>::code_t* codes,
                                   const float* scales, int64_t scale_stride, T* out,
                                   int64_t groups, int64_t G, const DecodeConsts& k) {
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = scales[g * scale_stride];
    if constexpr (F == QuantFormat::kFp8E4M3) {
      if (fold_scale_256(scale)) {
        dequantize_group<F, T, true>(codes + g * G, out + g * G, G, scale, k);
        continue;
      }
    }
    dequantize_group<F, T, false>(codes + g * G, out + g * G, G, scale, k);
  }
}

}  // namespace avx2

#undef KVCOMPACT_AVX512
#undef KVCOMPACT_AVX512_INLINE
#undef KVCOMPACT_AVX2
#undef KVCOMPACT_AVX2_INLINE

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // KVCOMPACT_X86_SIMD

}  // namespace cpu
}  // namespace kvcompact

// Device-side batch forms of quant_math.h's encode<F> / dequantize_value<F>.
//
// Same results as the scalar functions for every input, bit for bit; they exist
// because the scalar fp8 conversions (c10's integer bit manipulation, ~17
// instructions and two branches per element) make a bf16 -> fp8 kernel
// instruction-bound on Hopper long before it reaches memory bandwidth. On sm_89+
// the conversions use the hardware instructions instead:
//  * encode: cvt.rn.satfinite.{e4m3,e5m2}x2.f32 rounds to nearest-even, as c10's
//    fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value do. The two can only
//    differ outside the finite range (NaN, overflow), and the input here is
//    clamp(x / scale, -QMAX, QMAX) with a finite scale: finite and in range.
//  * decode: fp8 -> fp16 (cvt.rn.f16x2.{e4m3,e5m2}x2) and fp16 -> fp32 are both
//    exact, so the float is the code's exact value, as c10's decode gives; only
//    NaN payloads may differ, and NaN stays NaN.
// Everything else (the division, the clamp, the int8 rint, the multiply by the
// scale) is quant_math.h's code. Define KVCOMPACT_CUDA_SOFT_FP8 to use c10's
// conversions on every arch (tests/test_quantize_cuda.py checks both against the
// CPU kernel, including every rounding boundary of both formats).
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kvcompact/quant_math.h"

namespace kvcompact {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(KVCOMPACT_CUDA_SOFT_FP8)
#define KVCOMPACT_HW_FP8_CVT 1
#else
#define KVCOMPACT_HW_FP8_CVT 0
#endif

template <QuantFormat F>
constexpr __nv_fp8_interpretation_t fp8_interpretation() {
  return F == QuantFormat::kFp8E4M3 ? __NV_E4M3 : __NV_E5M2;
}

// out[j] = encode<F>(x[j], scale) for j < N (N even).
template <QuantFormat F, int N>
__device__ __forceinline__ void encode_n(const float (&x)[N], float scale,
                                         typename FormatTraits<F>::code_t (&out)[N]) {
  static_assert(N % 2 == 0, "encode_n: N must be even");
  if (!is_finite(scale)) {  // a NaN/Inf group: all codes 0, as encode<F> gives
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = 0;
    return;
  }
#if KVCOMPACT_HW_FP8_CVT
  if constexpr (F != QuantFormat::kInt8) {
#pragma unroll
    for (int j = 0; j < N; j += 2) {
      const float2 q = make_float2(clamp_to_qmax<F>(x[j] / scale),
                                   clamp_to_qmax<F>(x[j + 1] / scale));
      const __nv_fp8x2_storage_t pair =
          __nv_cvt_float2_to_fp8x2(q, __NV_SATFINITE, fp8_interpretation<F>());
      out[j] = static_cast<uint8_t>(pair & 0xff);  // q.x goes to the low byte
      out[j + 1] = static_cast<uint8_t>(pair >> 8);
    }
  } else  // NOLINT(readability/braces): int8 takes the shared scalar path below
#endif
  {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = encode<F>(x[j], scale);
  }
}

// The exact float value of one code (decode<F>).
template <QuantFormat F>
__device__ __forceinline__ float decode_device(typename FormatTraits<F>::code_t code) {
  if constexpr (F == QuantFormat::kFp8E5M2) {
    // e5m2 is the top byte of an fp16; widening is exact on every arch.
    return __half2float(__ushort_as_half(static_cast<unsigned short>(code << 8)));
  }
#if KVCOMPACT_HW_FP8_CVT
  if constexpr (F == QuantFormat::kFp8E4M3) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw(code, __NV_E4M3);
    return __half2float(__ushort_as_half(h.x));
  }
#endif
  return decode<F>(code);
}

// out[j] = dequantize_value<F>(codes[j], scale) rounded to scalar_t.
template <QuantFormat F, typename scalar_t, int N>
__device__ __forceinline__ void dequantize_n(const typename FormatTraits<F>::code_t (&codes)[N],
                                             float scale, scalar_t (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<scalar_t>(decode_device<F>(codes[j]) * scale);
}

}  // namespace kvcompact

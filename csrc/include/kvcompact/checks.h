// Host-side argument checks shared by every backend.
//
// Every message names the op and the argument, and the exception type maps to
// the Python one a user expects: TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_INDEX -> IndexError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <c10/util/string_view.h>

#include "kvcompact/layout.h"
#include "kvcompact/quant_math.h"

namespace kvcompact {

inline QuantFormat parse_format(const char* op, c10::string_view fmt) {
  if (fmt == "fp8_e4m3") return QuantFormat::kFp8E4M3;
  if (fmt == "fp8_e5m2") return QuantFormat::kFp8E5M2;
  if (fmt == "int8") return QuantFormat::kInt8;
  TORCH_CHECK_VALUE(false, op, ": `fmt` must be one of 'fp8_e4m3', 'fp8_e5m2', 'int8'; got '",
                    std::string(fmt.data(), fmt.size()), "'");
}

inline c10::ScalarType code_dtype(QuantFormat f) {
  switch (f) {
    case QuantFormat::kFp8E4M3: return c10::ScalarType::Float8_e4m3fn;
    case QuantFormat::kFp8E5M2: return c10::ScalarType::Float8_e5m2;
    case QuantFormat::kInt8: return c10::ScalarType::Char;
  }
  return c10::ScalarType::Undefined;
}

// The format a code tensor stores, from its dtype.
inline QuantFormat format_of_codes(const char* op, const at::Tensor& codes) {
  switch (codes.scalar_type()) {
    case c10::ScalarType::Float8_e4m3fn: return QuantFormat::kFp8E4M3;
    case c10::ScalarType::Float8_e5m2: return QuantFormat::kFp8E5M2;
    case c10::ScalarType::Char: return QuantFormat::kInt8;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": `codes` must be float8_e4m3fn, float8_e5m2 or int8; got ",
                   codes.scalar_type());
}

inline bool is_float_activation(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Half ||
         t == c10::ScalarType::BFloat16;
}

inline void check_activation_dtype(const char* op, const char* name,
                                   const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_activation(t.scalar_type()), op, ": `", name,
                   "` must be float32, float16 or bfloat16; got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name_a,
                              const at::Tensor& a, const char* name_b,
                              const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": `", name_a, "` (on ",
                    a.device(), ") and `", name_b, "` (on ", b.device(),
                    ") must be on the same device");
}

inline void check_leading_rank(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": `", name,
                    "` must have at least one dimension [..., D]; got a 0-d tensor");
  TORCH_CHECK_VALUE(t.dim() - 1 <= kMaxLeadingDims, op, ": `", name,
                    "` has ", t.dim(), " dims; at most ", kMaxLeadingDims + 1,
                    " are supported");
}

// Fills one tensor's leading strides into a RowOffsets (sizes are taken from `t`
// for index 0 and must match for the others; callers check shapes first).
template <int N>
inline void set_row_strides(RowOffsets<N>& rows, int which, const at::Tensor& t) {
  rows.ndim = static_cast<int>(t.dim()) - 1;
  for (int d = 0; d < rows.ndim; ++d) {
    rows.sizes[d] = t.size(d);
    rows.strides[which][d] = t.stride(d);
  }
}

}  // namespace kvcompact

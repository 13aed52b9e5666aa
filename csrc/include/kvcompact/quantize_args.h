// Validation shared by the CPU and CUDA quantize/dequantize entry points, so the
// two backends accept and reject exactly the same inputs.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include "kvcompact/checks.h"

namespace kvcompact {

struct QuantizeShape {
  QuantFormat fmt;
  int64_t rows;        // product of the leading dims
  int64_t dim;         // D, the last dim
  int64_t group_size;  // consecutive elements of D sharing one scale
  int64_t groups;      // D / group_size
};

// x [..., D] float; codes [..., D] in fmt's dtype; scales [..., D / G] fp32.
inline QuantizeShape check_quantize_into(const char* op, const at::Tensor& x,
                                         const at::Tensor& codes, const at::Tensor& scales,
                                         c10::string_view fmt_name) {
  const QuantFormat fmt = parse_format(op, fmt_name);
  check_leading_rank(op, "x", x);
  check_activation_dtype(op, "x", x);
  check_same_device(op, "x", x, "codes", codes);
  check_same_device(op, "x", x, "scales", scales);
  TORCH_CHECK_TYPE(codes.scalar_type() == code_dtype(fmt), op, ": `codes` must be ",
                   code_dtype(fmt), " for fmt '", std::string(fmt_name.data(), fmt_name.size()), "'; got ",
                   codes.scalar_type());
  TORCH_CHECK_TYPE(scales.scalar_type() == c10::ScalarType::Float, op,
                   ": `scales` must be float32; got ", scales.scalar_type());
  TORCH_CHECK_VALUE(codes.sizes() == x.sizes(), op, ": `codes` must have x's shape ",
                    x.sizes(), "; got ", codes.sizes());
  const int64_t dim = x.size(-1);
  TORCH_CHECK_VALUE(dim > 0, op, ": `x` must have a non-empty last dim D; got D = 0");
  TORCH_CHECK_VALUE(scales.dim() == x.dim() && scales.sizes().slice(0, x.dim() - 1) ==
                                                   x.sizes().slice(0, x.dim() - 1),
                    op, ": `scales` must be [..., D // group_size] with x's leading dims ",
                    x.sizes().slice(0, x.dim() - 1), "; got ", scales.sizes());
  const int64_t groups = scales.size(-1);
  TORCH_CHECK_VALUE(groups > 0 && dim % groups == 0, op, ": `scales` last dim (", groups,
                    ") must divide D = ", dim);
  // An expanded output (stride 0) would be written by several rows at once: on CUDA a race,
  // on CPU the last row silently wins. Refused like an in-place torch op does.
  TORCH_CHECK_VALUE(at::has_internal_overlap(codes) != at::MemOverlap::Yes, op,
                    ": `codes` has elements sharing memory (an expanded view?); it cannot be written");
  TORCH_CHECK_VALUE(at::has_internal_overlap(scales) != at::MemOverlap::Yes, op,
                    ": `scales` has elements sharing memory (an expanded view?); it cannot be written");
  return QuantizeShape{fmt, x.numel() / dim, dim, dim / groups, groups};
}

// codes [..., D]; scales [..., D / G] fp32; out [..., D] float.
inline QuantizeShape check_dequantize_into(const char* op, const at::Tensor& codes,
                                           const at::Tensor& scales, const at::Tensor& out) {
  check_leading_rank(op, "codes", codes);
  const QuantFormat fmt = format_of_codes(op, codes);
  check_activation_dtype(op, "out", out);
  check_same_device(op, "codes", codes, "scales", scales);
  check_same_device(op, "codes", codes, "out", out);
  TORCH_CHECK_TYPE(scales.scalar_type() == c10::ScalarType::Float, op,
                   ": `scales` must be float32; got ", scales.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == codes.sizes(), op, ": `out` must have codes' shape ",
                    codes.sizes(), "; got ", out.sizes());
  const int64_t dim = codes.size(-1);
  TORCH_CHECK_VALUE(dim > 0, op, ": `codes` must have a non-empty last dim D; got D = 0");
  TORCH_CHECK_VALUE(scales.dim() == codes.dim() &&
                        scales.sizes().slice(0, codes.dim() - 1) ==
                            codes.sizes().slice(0, codes.dim() - 1),
                    op, ": `scales` must be [..., D // group_size] with codes' leading dims ",
                    codes.sizes().slice(0, codes.dim() - 1), "; got ", scales.sizes());
  const int64_t groups = scales.size(-1);
  TORCH_CHECK_VALUE(groups > 0 && dim % groups == 0, op, ": `scales` last dim (", groups,
                    ") must divide D = ", dim);
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": `out` has elements sharing memory (an expanded view?); it cannot be written");
  return QuantizeShape{fmt, codes.numel() / dim, dim, dim / groups, groups};
}

// Output sizes of the allocating `quantize`: resolves group_size (None = D).
inline int64_t resolve_group_size(const char* op, const at::Tensor& x,
                                  std::optional<int64_t> group_size) {
  check_leading_rank(op, "x", x);
  const int64_t dim = x.size(-1);
  TORCH_CHECK_VALUE(dim > 0, op, ": `x` must have a non-empty last dim D; got D = 0");
  if (!group_size.has_value()) return dim;
  const int64_t g = *group_size;
  TORCH_CHECK_VALUE(g > 0, op, ": `group_size` must be positive; got ", g);
  TORCH_CHECK_VALUE(dim % g == 0, op, ": `group_size` (", g, ") must divide D = ", dim);
  return g;
}

}  // namespace kvcompact

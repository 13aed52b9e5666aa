// The allocating `quantize` / `dequantize` ops, written once for every backend:
// they size the outputs and hand off to that backend's `_into_` kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "kvcompact/quantize_args.h"

namespace kvcompact {

using QuantizeIntoFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                c10::string_view);
using DequantizeIntoFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&);

template <QuantizeIntoFn IntoFn>
std::tuple<at::Tensor, at::Tensor> quantize_alloc(const at::Tensor& x, c10::string_view fmt,
                                                  std::optional<int64_t> group_size) {
  const QuantFormat format = parse_format("quantize", fmt);
  const int64_t g = resolve_group_size("quantize", x, group_size);
  check_activation_dtype("quantize", "x", x);
  auto codes = at::empty(x.sizes(), x.options().dtype(code_dtype(format)));
  auto scale_sizes = x.sizes().vec();
  scale_sizes.back() = x.size(-1) / g;
  auto scales = at::empty(scale_sizes, x.options().dtype(c10::ScalarType::Float));
  IntoFn(x, codes, scales, fmt);
  return {codes, scales};
}

template <DequantizeIntoFn IntoFn>
at::Tensor dequantize_alloc(const at::Tensor& codes, const at::Tensor& scales,
                            c10::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_float_activation(dtype),
                   "dequantize: `dtype` must be float32, float16 or bfloat16; got ", dtype);
  check_leading_rank("dequantize", "codes", codes);
  auto out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  IntoFn(codes, scales, out);
  return out;
}

}  // namespace kvcompact

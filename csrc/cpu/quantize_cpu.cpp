// CPU quantize / dequantize.
//
// Strategy: rows ([..., D] flattened over the leading dims, each with its own
// strides) are split across threads with at::parallel_for. Each row is handled
// in one pass per group: a reduction for absmax, then the encode loop, both over
// contiguous memory in the common case (last-dim stride 1), which the compiler
// vectorizes. The scalar math is quant_math.h's, shared with CUDA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>

#include "kvcompact/quant_math.h"
#include "kvcompact/quantize_alloc.h"
#include "kvcompact/quantize_args.h"

namespace kvcompact {
namespace {

// Rows per parallel task: large enough that a task moves >= ~16 KiB at D = 128.
constexpr int64_t kRowsPerTask = 64;

template <QuantFormat F, typename scalar_t>
void quantize_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                   const QuantizeShape& shape) {
  using code_t = typename FormatTraits<F>::code_t;
  constexpr float qmax = FormatTraits<F>::kQmax;
  RowOffsets<3> rows;
  set_row_strides(rows, 0, x);
  set_row_strides(rows, 1, codes);
  set_row_strides(rows, 2, scales);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  code_t* code_ptr = static_cast<code_t*>(codes.data_ptr());
  float* scale_ptr = scales.data_ptr<float>();
  const int64_t sx = x.stride(-1), sc = codes.stride(-1), ss = scales.stride(-1);
  const int64_t G = shape.group_size;

  at::parallel_for(0, shape.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    int64_t off[3];
    for (int64_t row = begin; row < end; ++row) {
      rows.offsets(row, off);
      const scalar_t* xr = x_ptr + off[0];
      code_t* cr = code_ptr + off[1];
      float* sr = scale_ptr + off[2];
      for (int64_t g = 0; g < shape.groups; ++g) {
        const scalar_t* xg = xr + g * G * sx;
        code_t* cg = cr + g * G * sc;
        float scale;
        if (sx == 1 && sc == 1) {
          // Contiguous group: an integer max over abs_bits (absmax and the
          // NaN/Inf test in one branch-free reduction), then a branch-free
          // encode loop; both vectorize.
          uint32_t max_bits = 0;
          for (int64_t i = 0; i < G; ++i) {
            const uint32_t b = abs_bits(static_cast<float>(xg[i]));
            max_bits = b > max_bits ? b : max_bits;
          }
          scale = group_scale(GroupStats::from_max_abs_bits(max_bits), qmax);
          for (int64_t i = 0; i < G; ++i) {
            cg[i] = encode<F>(static_cast<float>(xg[i]), scale);
          }
        } else {
          GroupStats st;
          for (int64_t i = 0; i < G; ++i) st.add(static_cast<float>(xg[i * sx]));
          scale = group_scale(st, qmax);
          for (int64_t i = 0; i < G; ++i) {
            cg[i * sc] = encode<F>(static_cast<float>(xg[i * sx]), scale);
          }
        }
        sr[g * ss] = scale;
      }
    }
  });
}

// decode<F> of every code, tabulated once: a table load replaces c10's
// branchy fp8 -> fp32 conversion in the dequantize loop. Built from decode<F>
// itself, so the values are the contract's by construction.
template <QuantFormat F>
const float* decode_table() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) {
      t[c] = decode<F>(static_cast<typename FormatTraits<F>::code_t>(static_cast<uint8_t>(c)));
    }
    return t;
  }();
  return table.data();
}

template <QuantFormat F, typename scalar_t>
void dequantize_rows(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& out,
                     const QuantizeShape& shape) {
  using code_t = typename FormatTraits<F>::code_t;
  RowOffsets<3> rows;
  set_row_strides(rows, 0, codes);
  set_row_strides(rows, 1, scales);
  set_row_strides(rows, 2, out);
  const code_t* code_ptr = static_cast<const code_t*>(codes.const_data_ptr());
  const float* scale_ptr = scales.const_data_ptr<float>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t sc = codes.stride(-1), ss = scales.stride(-1), so = out.stride(-1);
  const int64_t G = shape.group_size;
  const float* table = decode_table<F>();

  at::parallel_for(0, shape.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    int64_t off[3];
    for (int64_t row = begin; row < end; ++row) {
      rows.offsets(row, off);
      const code_t* cr = code_ptr + off[0];
      const float* sr = scale_ptr + off[1];
      scalar_t* yr = out_ptr + off[2];
      for (int64_t g = 0; g < shape.groups; ++g) {
        const float scale = sr[g * ss];
        const code_t* cg = cr + g * G * sc;
        scalar_t* yg = yr + g * G * so;
        if (sc == 1 && so == 1) {
          for (int64_t i = 0; i < G; ++i) {
            yg[i] = static_cast<scalar_t>(table[static_cast<uint8_t>(cg[i])] * scale);
          }
        } else {
          for (int64_t i = 0; i < G; ++i) {
            yg[i * so] = static_cast<scalar_t>(table[static_cast<uint8_t>(cg[i * sc])] * scale);
          }
        }
      }
    }
  });
}

void quantize_into_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       c10::string_view fmt) {
  const QuantizeShape shape = check_quantize_into("quantize_into_", x, codes, scales, fmt);
  if (shape.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_into_", [&] {
    dispatch_format(shape.fmt, [&](auto format) {
      quantize_rows<decltype(format)::value, scalar_t>(x, codes, scales, shape);
    });
  });
}

void dequantize_into_cpu(const at::Tensor& codes, const at::Tensor& scales,
                         const at::Tensor& out) {
  const QuantizeShape shape = check_dequantize_into("dequantize_into_", codes, scales, out);
  if (shape.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_into_", [&] {
    dispatch_format(shape.fmt, [&](auto format) {
      dequantize_rows<decltype(format)::value, scalar_t>(codes, scales, out, shape);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CPU, m) {
  m.impl("quantize", &quantize_alloc<&quantize_into_cpu>);
  m.impl("quantize_into_", &quantize_into_cpu);
  m.impl("dequantize", &dequantize_alloc<&dequantize_into_cpu>);
  m.impl("dequantize_into_", &dequantize_into_cpu);
}

}  // namespace kvcompact

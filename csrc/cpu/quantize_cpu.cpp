// CPU quantize / dequantize.
//
// Strategy: rows ([..., D] flattened over the leading dims, each with its own
// strides) are split across threads with at::parallel_for. Rows whose last
// dim is contiguous in x / codes / out (the common case, transposed
// [B, T, H, D] key views included) go to explicit SIMD kernels
// (kvcompact/cpu/quant_simd.h); when the leading dims also collapse (a
// contiguous tensor), a task's rows form one run of groups handled in a single
// call, otherwise a RowCursor walks the rows without a division per row.
// Strided last dims, and CPUs without AVX2, take the scalar loops below, which
// are also the reference the SIMD kernels are tested against.
//
// ISA dispatch: cpu::cpu_isa() (kvcompact/cpu/isa.h, shared with the other CPU
// kernels) picks AVX-512 (F/BW/VL/DQ, 16 lanes), AVX2 (8 lanes, with F16C) or
// scalar from __builtin_cpu_supports, on each call. The SIMD functions carry
// per-function target attributes, so the library is still compiled for
// baseline x86-64 (no global flag changes) and loads on any x86-64 CPU.
// KVCOMPACT_CPU_ISA=avx512|avx2|scalar|auto lowers the choice; the tests run
// every path bit for bit with it.
//
// What is vectorised. Quantize, per block of groups held in registers: the
// bf16/fp16/fp32 -> fp32 widening, the abs_bits max (absmax and the NaN/Inf
// test in one unsigned max; u16 lanes for bf16), the reduction of several
// groups' maxima and their group_scale at once (AVX-512, G = 16/32/64/128; any
// other G runs a masked per-group loop with the scalar group_scale), x / scale
// (vdivps), the clamp, the fp8 encode (the branch-free integer form of
// quant_math.h's fp8_from_clamped, on |x| / scale with the sign bit added from
// x) or the int8 round-half-even, and the narrowing to code bytes.
// Dequantize, per group: the code -> fp32 decode (fp16 conversions), the
// multiply by the scale and the rounding to the output dtype (c10's
// round-to-nearest-even for bf16, vcvtps2ph plus c10's NaN for fp16).
//
// Why it is exact: each lane performs the same IEEE operations as quant_math.h's
// scalar encode / decode / group_scale (the single source of truth shared with
// CUDA): vdivps and vmulps are correctly rounded like divss / mulss, and no
// FMA or reciprocal is used. The pieces that differ in form (fp8 decode
// through fp16, the e4m3 * 256 folded into the scale only when exact, the
// bf16/fp16 rounding, the vector group_scale, zero codes for non-finite
// groups) are exact by construction and were checked exhaustively against the
// scalar forms, over all 2^32 fp32 inputs and all 256 codes (quant_simd.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <type_traits>

#include "kvcompact/cpu/quant_simd.h"
#include "kvcompact/quant_math.h"
#include "kvcompact/quantize_alloc.h"
#include "kvcompact/quantize_args.h"

namespace kvcompact {
namespace {

// Rows per parallel task: large enough that a task moves >= ~16 KiB at D = 128.
constexpr int64_t kRowsPerTask = 64;

// Offsets of consecutive rows from `begin` on: the leading multi-index is
// unravelled once (RowOffsets::offsets) and then advanced like an odometer, so
// the per-row cost is an add per tensor instead of a 64-bit division per dim.
template <int N>
struct RowCursor {
  const RowOffsets<N>& rows;
  int64_t idx[kMaxLeadingDims] = {};
  int64_t off[N];

  RowCursor(const RowOffsets<N>& r, int64_t row) : rows(r) {
    r.offsets(row, off);
    for (int d = r.ndim - 1; d >= 0; --d) {
      idx[d] = row % r.sizes[d];
      row /= r.sizes[d];
    }
  }

  void next() {
    for (int d = rows.ndim - 1; d >= 0; --d) {
      for (int t = 0; t < N; ++t) off[t] += rows.strides[t][d];
      if (++idx[d] < rows.sizes[d]) return;
      for (int t = 0; t < N; ++t) off[t] -= rows.strides[t][d] * rows.sizes[d];
      idx[d] = 0;
    }
  }
};

// True when row r of tensor `t` starts at r * step, i.e. its leading dims
// collapse into one of stride `step`: consecutive rows then form one run of
// groups, which the SIMD kernels take in a single call (multi-group blocks
// need not stop at row ends; G divides D, so no group straddles two rows).
template <int N>
bool rows_are_linear(const RowOffsets<N>& rows, int t, int64_t step) {
  int64_t expect = step;
  for (int d = rows.ndim - 1; d >= 0; --d) {
    if (rows.sizes[d] != 1 && rows.strides[t][d] != expect) return false;
    expect *= rows.sizes[d];
  }
  return true;
}

// The SIMD row kernel for a row of `groups` groups of G contiguous elements,
// or nullptr where the scalar loop runs (strided rows, no AVX2, G < 8 on AVX2).
template <QuantFormat F, typename scalar_t>
using QuantizeRowFn = void (*)(const scalar_t*, typename FormatTraits<F>::code_t*, float*,
                               int64_t, int64_t, int64_t);

template <QuantFormat F, typename scalar_t>
QuantizeRowFn<F, scalar_t> pick_quantize_row(bool contiguous, int64_t G) {
  if (!contiguous) return nullptr;
#if KVCOMPACT_X86_SIMD
  // fp32/fp16/bf16 only (AT_DISPATCH also instantiates double, which stays scalar).
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half> ||
                std::is_same_v<scalar_t, c10::BFloat16>) {
    switch (cpu::cpu_isa()) {
      case cpu::Isa::kAvx512:
        switch (G) {
          case 16: return &cpu::avx512::quantize_row_fixed<F, scalar_t, 1>;
          case 32: return &cpu::avx512::quantize_row_fixed<F, scalar_t, 2>;
          case 64: return &cpu::avx512::quantize_row_fixed<F, scalar_t, 4>;
          case 128: return &cpu::avx512::quantize_row_fixed<F, scalar_t, 8>;
          default: return &cpu::avx512::quantize_row<F, scalar_t>;
        }
      case cpu::Isa::kAvx2:
        return G >= 8 ? &cpu::avx2::quantize_row<F, scalar_t> : nullptr;
      default:
        break;
    }
  }
#endif
  return nullptr;
}

template <QuantFormat F, typename scalar_t>
using DequantizeRowFn = void (*)(const typename FormatTraits<F>::code_t*, const float*, int64_t,
                                 scalar_t*, int64_t, int64_t, const cpu::DecodeConsts&);

template <QuantFormat F, typename scalar_t>
DequantizeRowFn<F, scalar_t> pick_dequantize_row(bool contiguous, int64_t G) {
  if (!contiguous) return nullptr;
#if KVCOMPACT_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half> ||
                std::is_same_v<scalar_t, c10::BFloat16>) {
    switch (cpu::cpu_isa()) {
      case cpu::Isa::kAvx512:
        return &cpu::avx512::dequantize_row<F, scalar_t>;
      case cpu::Isa::kAvx2:
        return G >= 8 ? &cpu::avx2::dequantize_row<F, scalar_t> : nullptr;
      default:
        break;
    }
  }
#endif
  return nullptr;
}

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
  const auto simd_row = pick_quantize_row<F, scalar_t>(sx == 1 && sc == 1, G);
  const bool one_run = simd_row != nullptr && rows_are_linear(rows, 0, shape.dim) &&
                       rows_are_linear(rows, 1, shape.dim) &&
                       rows_are_linear(rows, 2, shape.groups * ss);

  at::parallel_for(0, shape.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    if (one_run) {
      simd_row(x_ptr + begin * shape.dim, code_ptr + begin * shape.dim,
               scale_ptr + begin * shape.groups * ss, ss, (end - begin) * shape.groups, G);
      return;
    }
    RowCursor<3> cursor(rows, begin);
    for (int64_t row = begin; row < end; ++row, cursor.next()) {
      const int64_t* off = cursor.off;
      const scalar_t* xr = x_ptr + off[0];
      code_t* cr = code_ptr + off[1];
      float* sr = scale_ptr + off[2];
      if (simd_row != nullptr) {
        simd_row(xr, cr, sr, ss, shape.groups, G);
        continue;
      }
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
  const auto simd_row = pick_dequantize_row<F, scalar_t>(sc == 1 && so == 1, G);
  const cpu::DecodeConsts consts = cpu::decode_consts<F>();
  const bool one_run = simd_row != nullptr && rows_are_linear(rows, 0, shape.dim) &&
                       rows_are_linear(rows, 1, shape.groups * ss) &&
                       rows_are_linear(rows, 2, shape.dim);

  at::parallel_for(0, shape.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    if (one_run) {
      simd_row(code_ptr + begin * shape.dim, scale_ptr + begin * shape.groups * ss, ss,
               out_ptr + begin * shape.dim, (end - begin) * shape.groups, G, consts);
      return;
    }
    RowCursor<3> cursor(rows, begin);
    for (int64_t row = begin; row < end; ++row, cursor.next()) {
      const int64_t* off = cursor.off;
      const code_t* cr = code_ptr + off[0];
      const float* sr = scale_ptr + off[1];
      scalar_t* yr = out_ptr + off[2];
      if (simd_row != nullptr) {
        simd_row(cr, sr, ss, yr, shape.groups, G, consts);
        continue;
      }
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

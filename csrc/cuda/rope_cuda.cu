// CUDA rope_shift_ and rope_shift_quantized_.
//
// rope_shift_: a CTA owns a tile of kTokensPerTile tokens and a group of rows.
// It first fills a shared cos/sin table for its tokens (fp64 angles, rounded to
// fp32, rope_math.h); with a shared delta [T] the table serves every row of the
// group, so the fp64 sincos cost is paid once per token and row group, not per
// element. Threads then walk (token, pair) of each row; consecutive threads take
// consecutive pairs, so the two loads of a pair are both coalesced for neox
// (x[i], x[i + R/2]) and gptj (x[2i], x[2i + 1]). Every load is followed by its
// store to the same elements, so in-place needs no ordering.
//
// rope_shift_quantized_: one warp per (b, h, token): dequantize the token's D
// values into shared fp32, rotate its pairs, then per group reduce absmax across
// the warp, compute the scale (quant_math.h) and encode. The arithmetic is the
// CPU's term for term (no FMA contraction: rope_math.h uses _rn intrinsics).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "kvcompact/quant_math.h"
#include "kvcompact/rope_args.h"
#include "kvcompact/rope_math.h"

namespace kvcompact {
namespace {

constexpr int kThreads = 256;
constexpr int kTokensPerTile = 16;
constexpr int64_t kRowsPerGroup = 16;
constexpr int kWarpsPerBlock = 4;

struct RopeParams {
  int64_t B, H, T, half;
  int64_t sb, sh, st, sd;      // key strides (elements)
  int64_t db, dh, dt;          // delta strides (db = dh = 0 for a shared [T] delta)
  int64_t rows_per_group;
  RopeStyle style;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rope_shift_kernel(scalar_t* __restrict__ keys, const int64_t* __restrict__ delta,
                      const float* __restrict__ inv_freq, const RopeParams p) {
  extern __shared__ float2 table[];  // [kTokensPerTile][half] of (cos, sin)
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTokensPerTile;
  const int ntok = static_cast<int>(p.T - t0 < kTokensPerTile ? p.T - t0 : kTokensPerTile);
  const int64_t rows = p.B * p.H;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * p.rows_per_group;
  const int64_t r1 = r0 + p.rows_per_group < rows ? r0 + p.rows_per_group : rows;
  const int pairs = ntok * static_cast<int>(p.half);

  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    // A per-row delta comes with one row per CTA, so the table is built once either way.
    if (r == r0) {
      for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int tok = i / static_cast<int>(p.half), k = i - tok * static_cast<int>(p.half);
        const int64_t d = delta[b * p.db + h * p.dh + (t0 + tok) * p.dt];
        float c, s;
        rope_cos_sin(d, inv_freq[k], c, s);
        table[i] = make_float2(c, s);
      }
      __syncthreads();
    }
    scalar_t* row = keys + b * p.sb + h * p.sh + t0 * p.st;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
      const int tok = i / static_cast<int>(p.half), k = i - tok * static_cast<int>(p.half);
      int64_t ia, ib;
      rope_pair(p.style, p.half, k, ia, ib);
      scalar_t* x = row + tok * p.st;
      const float2 cs = table[i];
      float y1, y2;
      rope_rotate(static_cast<float>(x[ia * p.sd]), static_cast<float>(x[ib * p.sd]), cs.x, cs.y,
                  y1, y2);
      x[ia * p.sd] = static_cast<scalar_t>(y1);
      x[ib * p.sd] = static_cast<scalar_t>(y2);
    }
  }
}

struct RopeQuantParams {
  int64_t B, H, T, D, half, G, groups;
  int64_t cb, ch, ct, cd;  // code strides
  int64_t qb, qh, qt, qg;  // scale strides
  int64_t db, dh, dt;      // delta strides
  RopeStyle style;
};

template <QuantFormat F>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    rope_shift_quantized_kernel(typename FormatTraits<F>::code_t* __restrict__ codes,
                                float* __restrict__ scales, const int64_t* __restrict__ delta,
                                const float* __restrict__ inv_freq, const RopeQuantParams p) {
  using code_t = typename FormatTraits<F>::code_t;
  constexpr float qmax = FormatTraits<F>::kQmax;
  extern __shared__ float buf_all[];  // [kWarpsPerBlock][D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (item >= p.B * p.H * p.T) return;  // whole warp exits together
  const int64_t t = item % p.T, r = item / p.T, b = r / p.H, h = r % p.H;
  float* buf = buf_all + warp * p.D;
  code_t* c = codes + b * p.cb + h * p.ch + t * p.ct;
  float* s = scales + b * p.qb + h * p.qh + t * p.qt;

  for (int64_t i = lane; i < p.D; i += 32) {
    buf[i] = dequantize_value<F>(c[i * p.cd], s[(i / p.G) * p.qg]);
  }
  __syncwarp();
  const int64_t d = delta[b * p.db + h * p.dh + t * p.dt];
  for (int64_t k = lane; k < p.half; k += 32) {
    int64_t ia, ib;
    rope_pair(p.style, p.half, k, ia, ib);
    float cs, sn, y1, y2;
    rope_cos_sin(d, inv_freq[k], cs, sn);
    rope_rotate(buf[ia], buf[ib], cs, sn, y1, y2);
    buf[ia] = y1;
    buf[ib] = y2;
  }
  __syncwarp();
  for (int64_t g = 0; g < p.groups; ++g) {
    GroupStats st;
    for (int64_t i = g * p.G + lane; i < (g + 1) * p.G; i += 32) st.add(buf[i]);
    for (int off = 16; off > 0; off /= 2) {  // max and "any non-finite" are order-free
      GroupStats other;
      other.absmax = __shfl_xor_sync(0xffffffffu, st.absmax, off);
      other.nonfinite = __shfl_xor_sync(0xffffffffu, static_cast<int>(st.nonfinite), off) != 0;
      st.merge(other);
    }
    const float scale = group_scale(st, qmax);
    for (int64_t i = g * p.G + lane; i < (g + 1) * p.G; i += 32) {
      c[i * p.cd] = encode<F>(buf[i], scale);
    }
    if (lane == 0) s[g * p.qg] = scale;
  }
}

void rope_shift_cuda(const at::Tensor& keys, const at::Tensor& delta, const at::Tensor& inv_freq,
                     c10::string_view style) {
  const RopeShape sh = check_rope_shift("rope_shift_", keys, delta, inv_freq, style);
  if (keys.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  const at::Tensor freq = inv_freq.contiguous();
  RopeParams p;
  p.B = sh.B; p.H = sh.H; p.T = sh.T; p.half = sh.half;
  p.sb = keys.stride(0); p.sh = keys.stride(1); p.st = keys.stride(2); p.sd = keys.stride(3);
  const int64_t rows = sh.B * sh.H;
  if (sh.delta_per_row) {
    p.db = delta.stride(0); p.dh = delta.stride(1); p.dt = delta.stride(2);
    p.rows_per_group = 1;
  } else {
    p.db = 0; p.dh = 0; p.dt = delta.stride(0);
    p.rows_per_group = std::min(rows, kRowsPerGroup);
  }
  p.style = sh.style;
  const dim3 grid(static_cast<unsigned>((sh.T + kTokensPerTile - 1) / kTokensPerTile),
                  static_cast<unsigned>((rows + p.rows_per_group - 1) / p.rows_per_group));
  TORCH_CHECK(grid.y <= 65535, "rope_shift_: too many (b, h) rows for one launch (", rows, ")");
  const size_t smem = sizeof(float2) * kTokensPerTile * sh.half;
  TORCH_CHECK_VALUE(smem <= 48 * 1024, "rope_shift_: rotary dim too large for the CUDA kernel");
  const auto stream = c10::cuda::getCurrentCUDAStream(keys.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "rope_shift_", [&] {
    rope_shift_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        keys.data_ptr<scalar_t>(), delta.const_data_ptr<int64_t>(), freq.const_data_ptr<float>(),
        p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <QuantFormat F>
void launch_rope_quantized(const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& delta, const at::Tensor& freq,
                           const RopeQuantParams& p) {
  const int64_t items = p.B * p.H * p.T;
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "rope_shift_quantized_: too many tokens");
  const size_t smem = sizeof(float) * kWarpsPerBlock * p.D;
  auto kernel = &rope_shift_quantized_kernel<F>;
  TORCH_CHECK_VALUE(smem <= 96 * 1024, "rope_shift_quantized_: head dim D = ", p.D,
                    " is too large for the CUDA kernel");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem,
           c10::cuda::getCurrentCUDAStream(codes.device().index())>>>(
      static_cast<typename FormatTraits<F>::code_t*>(codes.data_ptr()), scales.data_ptr<float>(),
      delta.const_data_ptr<int64_t>(), freq.const_data_ptr<float>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rope_shift_quantized_cuda(const at::Tensor& codes, const at::Tensor& scales,
                               const at::Tensor& delta, const at::Tensor& inv_freq,
                               c10::string_view style) {
  const RopeQuantShape q =
      check_rope_shift_quantized("rope_shift_quantized_", codes, scales, delta, inv_freq, style);
  if (codes.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor freq = inv_freq.contiguous();
  const RopeShape& sh = q.rope;
  RopeQuantParams p;
  p.B = sh.B; p.H = sh.H; p.T = sh.T; p.D = sh.D; p.half = sh.half;
  p.G = q.group_size; p.groups = q.groups;
  p.cb = codes.stride(0); p.ch = codes.stride(1); p.ct = codes.stride(2); p.cd = codes.stride(3);
  p.qb = scales.stride(0); p.qh = scales.stride(1);
  p.qt = scales.stride(2); p.qg = scales.stride(3);
  if (sh.delta_per_row) {
    p.db = delta.stride(0); p.dh = delta.stride(1); p.dt = delta.stride(2);
  } else {
    p.db = 0; p.dh = 0; p.dt = delta.stride(0);
  }
  p.style = sh.style;
  switch (q.fmt) {
    case QuantFormat::kFp8E4M3:
      launch_rope_quantized<QuantFormat::kFp8E4M3>(codes, scales, delta, freq, p);
      break;
    case QuantFormat::kFp8E5M2:
      launch_rope_quantized<QuantFormat::kFp8E5M2>(codes, scales, delta, freq, p);
      break;
    case QuantFormat::kInt8:
      launch_rope_quantized<QuantFormat::kInt8>(codes, scales, delta, freq, p);
      break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CUDA, m) {
  m.impl("rope_shift_", &rope_shift_cuda);
  m.impl("rope_shift_quantized_", &rope_shift_quantized_cuda);
}

}  // namespace kvcompact

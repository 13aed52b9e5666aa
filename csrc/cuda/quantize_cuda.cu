// CUDA quantize / dequantize.
//
// Strategy. Both ops are pure streaming (each input byte read once, each output
// byte written once), so the kernels are shaped around memory transactions and
// keep arithmetic off the critical path:
//  * Quantize gives each group a power-of-two sub-warp (1..32 lanes). A lane owns
//    chunks of 16 consecutive elements: 16 codes are exactly one 16-byte store,
//    and the activations are two (fp16/bf16) or four (fp32) 16-byte loads. With
//    C = G / 16 chunks per group the sub-warp has min(32, next_pow2(C)) lanes and
//    each lane keeps ceil(C / lanes) chunks in registers (1 for every G <= 512),
//    so x is read exactly once: load, per-lane max |x| + NaN/Inf flag, shuffle-xor
//    reduction with GroupStats::merge inside the sub-warp, one scale per group,
//    encode from registers, store. G = 128 bf16 is 8 lanes per group, 4 groups
//    per warp; G = D = 256 is a full warp.
//  * Dequantize needs no reduction: a thread turns one 16-code chunk (one 16-byte
//    load) into 16 outputs (two or four 16-byte stores) with its group's scale.
//  * Work items (groups, chunks) are numbered flat over the leading dims and a
//    RowIndexer maps an item to its offset in every tensor (any leading strides:
//    transposed key views, slices of a cache buffer), with the leading dims
//    collapsed on the host and 32-bit magic-number division on the device.
//  * The grid covers the items with 256-thread blocks, capped at 32 blocks per SM
//    (4 waves of full occupancy) and grid-striding beyond, so [1, 8, 16384, 128]
//    and longer caches fill all 132 SMs of an H100.
//  * The fast path needs a contiguous last dim, G % 16 == 0 and 16-byte-aligned
//    pointers and leading strides (checked on the host). Anything else (views
//    offset by one element, strided last dims, odd group sizes) takes a scalar
//    kernel with the same sub-warp reduction that reads x twice.
//  * Arithmetic budget: at ~3 TB/s a bf16 -> fp8 pass moves ~1e12 elements/s,
//    which leaves ~30 issued instructions per element on 132 SMs. The IEEE
//    division (~10) fits; c10's software fp8 conversion (~17 plus branches) does
//    not, so the fast path converts with the sm_89+ hardware instructions
//    (quant_math_cuda.cuh, equal to encode<F> for every input this kernel feeds
//    it), and a NaN/Inf group's zero codes are one uniform branch per chunk.
// The math is quant_math.h's (GroupStats, group_scale, encode<F>,
// dequantize_value<F>), the code the CPU kernel runs, so the two backends agree
// bit for bit; this file adds only indexing, vector moves and reductions.
// Kernels run on the current stream of the tensors' device.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>

#include "kvcompact/quant_math.h"
#include "kvcompact/quant_math_cuda.cuh"
#include "kvcompact/quantize_alloc.h"
#include "kvcompact/quantize_args.h"
#include "kvcompact/row_indexer.h"
#include "kvcompact/vec.h"

namespace kvcompact {
namespace {

constexpr int kThreads = 256;         // threads per block
constexpr int kWarpSize = 32;
constexpr int kChunk = 16;            // elements per lane per vector step (16 code bytes)
constexpr int kMaxChunksPerLane = 4;  // register-resident path up to G = 32 * 4 * 16
constexpr int kBlocksPerSmCap = 32;   // 8 resident blocks of 256 threads x 4 waves
constexpr unsigned kFullMask = 0xffffffffu;

// The activation dtypes the ops accept (check_activation_dtype), and no others:
// AT_DISPATCH_FLOATING_TYPES would also instantiate every kernel for double.
#define KVCOMPACT_DISPATCH_ACTIVATION(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                        \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  TORCH_INTERNAL_ASSERT(device >= 0 && device < static_cast<int>(cache.size()));
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

unsigned grid_for(int64_t threads_needed, c10::DeviceIndex device) {
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  const int64_t cap = int64_t{multiprocessor_count(device)} * kBlocksPerSmCap;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

int log2_ceil(int64_t n) {
  int s = 0;
  while ((int64_t{1} << s) < n) ++s;
  return s;
}

int log2_floor(int64_t n) {
  int s = 0;
  while ((int64_t{2} << s) <= n) ++s;
  return s;
}

// Leading strides of `t` (all dims but the last) keep 16-byte alignment.
bool leading_strides_aligned16(const at::Tensor& t) {
  return strides_aligned16(static_cast<int>(t.dim()) - 1, t.sizes().data(), t.strides().data(),
                           static_cast<int64_t>(t.element_size()));
}

// ---------------------------------------------------------------------------
// quantize

template <typename scalar_t, typename code_t>
struct QuantizeArgs {
  const scalar_t* x;
  code_t* codes;
  float* scales;
  RowIndexer<3> groups;  // group -> offsets of its first element in x, codes; its scale
  int64_t num_groups;
  int64_t x_step;     // last-dim strides (scalar kernel only)
  int64_t code_step;
  int group_size;     // G
  int chunks;         // G / kChunk (vector kernel only)
  int lanes_log2;     // log2 of the lanes per group
};

// Sub-warp reduction of a group's stats: lanes [k * lanes, (k + 1) * lanes) of a
// warp hold one group each. Every lane of the warp must call it (full mask).
__device__ __forceinline__ GroupStats reduce_group(GroupStats st, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
    GroupStats other;
    other.absmax = __shfl_xor_sync(kFullMask, st.absmax, offset);
    other.nonfinite = __shfl_xor_sync(kFullMask, static_cast<int>(st.nonfinite), offset) != 0;
    st.merge(other);
  }
  return st;
}

// Fast path: see the strategy above. kChunksPerLane is ceil(C / lanes) rounded up
// to a power of two; chunks past C are masked off.
template <QuantFormat F, typename scalar_t, int kChunksPerLane>
__global__ void __launch_bounds__(kThreads)
    quantize_vec_kernel(const QuantizeArgs<scalar_t, typename FormatTraits<F>::code_t> a) {
  using code_t = typename FormatTraits<F>::code_t;
  constexpr float qmax = FormatTraits<F>::kQmax;
  const int lane = threadIdx.x % kWarpSize;
  const int lanes = 1 << a.lanes_log2;
  const int sub = lane >> a.lanes_log2;          // which group of the warp's
  const int lane_in_group = lane & (lanes - 1);
  const int groups_per_warp = kWarpSize >> a.lanes_log2;
  const int64_t warp = (int64_t{blockIdx.x} * kThreads + threadIdx.x) / kWarpSize;
  const int64_t num_warps = int64_t{gridDim.x} * kThreads / kWarpSize;

  // `first` is warp-uniform, so every lane runs the same iterations and reaches
  // the shuffles together, including lanes whose group is past the end.
  for (int64_t first = warp * groups_per_warp; first < a.num_groups;
       first += num_warps * groups_per_warp) {
    const int64_t group = first + sub;
    const bool valid = group < a.num_groups;
    int64_t off[3] = {0, 0, 0};
    if (valid) a.groups.offsets(group, off);

    float v[kChunksPerLane][kChunk];
    // Split reductions, as in the CPU fast path: a branch-free max of |x| and a
    // NaN/Inf detector (x * 0 is NaN exactly for NaN and Inf).
    float absmax = 0.0f, poison = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunksPerLane; ++k) {
      const int c = k * lanes + lane_in_group;
      if (valid && c < a.chunks) {
        scalar_t raw[kChunk];
        load_vec(a.x + off[0] + int64_t{c} * kChunk, raw);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          const float x = static_cast<float>(raw[j]);
          v[k][j] = x;
          const float m = x < 0.0f ? -x : x;
          absmax = m > absmax ? m : absmax;
          poison += x * 0.0f;
        }
      }
    }
    GroupStats st;
    st.absmax = absmax;
    st.nonfinite = !(poison == 0.0f);
    st = reduce_group(st, lanes);
    if (!valid) continue;

    const float scale = group_scale(st, qmax);
    if (lane_in_group == 0) a.scales[off[2]] = scale;
#pragma unroll
    for (int k = 0; k < kChunksPerLane; ++k) {
      const int c = k * lanes + lane_in_group;
      if (c < a.chunks) {
        code_t out[kChunk];
        encode_n<F>(v[k], scale, out);
        store_vec(a.codes + off[1] + int64_t{c} * kChunk, out);
      }
    }
  }
}

// Any strides, any G: lanes stride through the group element by element, and x
// is read a second time (mostly from L1/L2) to encode.
template <QuantFormat F, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    quantize_scalar_kernel(const QuantizeArgs<scalar_t, typename FormatTraits<F>::code_t> a) {
  constexpr float qmax = FormatTraits<F>::kQmax;
  const int lane = threadIdx.x % kWarpSize;
  const int lanes = 1 << a.lanes_log2;
  const int sub = lane >> a.lanes_log2;
  const int lane_in_group = lane & (lanes - 1);
  const int groups_per_warp = kWarpSize >> a.lanes_log2;
  const int64_t warp = (int64_t{blockIdx.x} * kThreads + threadIdx.x) / kWarpSize;
  const int64_t num_warps = int64_t{gridDim.x} * kThreads / kWarpSize;

  for (int64_t first = warp * groups_per_warp; first < a.num_groups;
       first += num_warps * groups_per_warp) {
    const int64_t group = first + sub;
    const bool valid = group < a.num_groups;
    int64_t off[3] = {0, 0, 0};
    GroupStats st;
    if (valid) {
      a.groups.offsets(group, off);
      for (int i = lane_in_group; i < a.group_size; i += lanes) {
        st.add(static_cast<float>(a.x[off[0] + i * a.x_step]));
      }
    }
    st = reduce_group(st, lanes);
    if (!valid) continue;

    const float scale = group_scale(st, qmax);
    if (lane_in_group == 0) a.scales[off[2]] = scale;
    for (int i = lane_in_group; i < a.group_size; i += lanes) {
      a.codes[off[1] + i * a.code_step] =
          encode<F>(static_cast<float>(a.x[off[0] + i * a.x_step]), scale);
    }
  }
}

template <QuantFormat F, typename scalar_t>
void launch_quantize(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const QuantizeShape& shape) {
  using code_t = typename FormatTraits<F>::code_t;
  const int64_t G = shape.group_size;
  RowOffsets<3> rows;
  set_row_strides(rows, 0, x);
  set_row_strides(rows, 1, codes);
  set_row_strides(rows, 2, scales);
  IndexSpace<3> space;
  space.add_leading(rows);
  space.add_dim(shape.groups, {G * x.stride(-1), G * codes.stride(-1), scales.stride(-1)});

  QuantizeArgs<scalar_t, code_t> a;
  a.x = x.const_data_ptr<scalar_t>();
  a.codes = static_cast<code_t*>(codes.data_ptr());
  a.scales = scales.data_ptr<float>();
  a.groups = space.build();
  a.num_groups = space.numel();
  a.x_step = x.stride(-1);
  a.code_step = codes.stride(-1);
  a.group_size = static_cast<int>(G);
  a.chunks = static_cast<int>(G / kChunk);

  const c10::DeviceIndex device = x.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const bool vector_ok = G % kChunk == 0 && x.stride(-1) == 1 && codes.stride(-1) == 1 &&
                         is_aligned16(a.x) && is_aligned16(a.codes) &&
                         leading_strides_aligned16(x) && leading_strides_aligned16(codes);
  if (vector_ok) {
    a.lanes_log2 = std::min(5, log2_ceil(a.chunks));
    const int per_lane = (a.chunks + (1 << a.lanes_log2) - 1) >> a.lanes_log2;
    const int64_t warps = (a.num_groups + (kWarpSize >> a.lanes_log2) - 1) >> (5 - a.lanes_log2);
    const unsigned grid = grid_for(warps * kWarpSize, device);
    if (per_lane == 1) {
      quantize_vec_kernel<F, scalar_t, 1><<<grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (per_lane == 2) {
      quantize_vec_kernel<F, scalar_t, 2><<<grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (per_lane <= kMaxChunksPerLane) {
      quantize_vec_kernel<F, scalar_t, kMaxChunksPerLane><<<grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  TORCH_CHECK_VALUE(G <= std::numeric_limits<int>::max(), "quantize_into_: group size ", G,
                    " is too large");
  a.lanes_log2 = std::min(5, log2_floor(G));
  const int64_t warps = (a.num_groups + (kWarpSize >> a.lanes_log2) - 1) >> (5 - a.lanes_log2);
  quantize_scalar_kernel<F, scalar_t>
      <<<grid_for(warps * kWarpSize, device), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// dequantize

template <typename code_t, typename scalar_t>
struct DequantizeArgs {
  const code_t* codes;
  const float* scales;
  scalar_t* out;
  RowIndexer<3> items;  // item -> offsets in codes, scales, out
  int64_t num_items;
};

// One item = 16 codes of one group (fast path).
template <QuantFormat F, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dequantize_vec_kernel(const DequantizeArgs<typename FormatTraits<F>::code_t, scalar_t> a) {
  using code_t = typename FormatTraits<F>::code_t;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t item = int64_t{blockIdx.x} * kThreads + threadIdx.x; item < a.num_items;
       item += stride) {
    int64_t off[3];
    a.items.offsets(item, off);
    const float scale = a.scales[off[1]];
    code_t c[kChunk];
    load_vec(a.codes + off[0], c);
    scalar_t y[kChunk];
    dequantize_n<F>(c, scale, y);
    store_vec(a.out + off[2], y);
  }
}

// One item = one element (any strides, any G).
template <QuantFormat F, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dequantize_scalar_kernel(const DequantizeArgs<typename FormatTraits<F>::code_t, scalar_t> a) {
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t item = int64_t{blockIdx.x} * kThreads + threadIdx.x; item < a.num_items;
       item += stride) {
    int64_t off[3];
    a.items.offsets(item, off);
    a.out[off[2]] = static_cast<scalar_t>(dequantize_value<F>(a.codes[off[0]], a.scales[off[1]]));
  }
}

template <QuantFormat F, typename scalar_t>
void launch_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& out,
                       const QuantizeShape& shape) {
  using code_t = typename FormatTraits<F>::code_t;
  const int64_t G = shape.group_size;
  RowOffsets<3> rows;
  set_row_strides(rows, 0, codes);
  set_row_strides(rows, 1, scales);
  set_row_strides(rows, 2, out);
  IndexSpace<3> space;
  space.add_leading(rows);
  const int64_t sc = codes.stride(-1), ss = scales.stride(-1), so = out.stride(-1);
  space.add_dim(shape.groups, {G * sc, ss, G * so});

  DequantizeArgs<code_t, scalar_t> a;
  a.codes = static_cast<const code_t*>(codes.const_data_ptr());
  a.scales = scales.const_data_ptr<float>();
  a.out = out.data_ptr<scalar_t>();

  const c10::DeviceIndex device = codes.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const bool vector_ok = G % kChunk == 0 && sc == 1 && so == 1 && is_aligned16(a.codes) &&
                         is_aligned16(a.out) && leading_strides_aligned16(codes) &&
                         leading_strides_aligned16(out);
  if (vector_ok) {
    space.add_dim(G / kChunk, {kChunk, 0, kChunk});
    a.items = space.build();
    a.num_items = space.numel();
    dequantize_vec_kernel<F, scalar_t>
        <<<grid_for(a.num_items, device), kThreads, 0, stream>>>(a);
  } else {
    space.add_dim(G, {sc, 0, so});
    a.items = space.build();
    a.num_items = space.numel();
    dequantize_scalar_kernel<F, scalar_t>
        <<<grid_for(a.num_items, device), kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// entry points

void quantize_into_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        c10::string_view fmt) {
  const QuantizeShape shape = check_quantize_into("quantize_into_", x, codes, scales, fmt);
  if (shape.rows == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  KVCOMPACT_DISPATCH_ACTIVATION(x.scalar_type(), "quantize_into_", [&] {
    dispatch_format(shape.fmt, [&](auto format) {
      launch_quantize<decltype(format)::value, scalar_t>(x, codes, scales, shape);
    });
  });
}

void dequantize_into_cuda(const at::Tensor& codes, const at::Tensor& scales,
                          const at::Tensor& out) {
  const QuantizeShape shape = check_dequantize_into("dequantize_into_", codes, scales, out);
  if (shape.rows == 0) return;
  const c10::cuda::CUDAGuard guard(codes.device());
  KVCOMPACT_DISPATCH_ACTIVATION(out.scalar_type(), "dequantize_into_", [&] {
    dispatch_format(shape.fmt, [&](auto format) {
      launch_dequantize<decltype(format)::value, scalar_t>(codes, scales, out, shape);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CUDA, m) {
  m.impl("quantize", &quantize_alloc<&quantize_into_cuda>);
  m.impl("quantize_into_", &quantize_into_cuda);
  m.impl("dequantize", &dequantize_alloc<&dequantize_into_cuda>);
  m.impl("dequantize_into_", &dequantize_into_cuda);
}

}  // namespace kvcompact

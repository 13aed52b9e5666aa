// CUDA compact_ and move_: in-place token moves along dim 2, one launch per group.
//
// Work unit. A CTA owns one tile: C consecutive destinations (logical indices
// [a, e)) of one (b, h) row, for every tensor of the launch (keys, values,
// codes, scales, positions: values are opaque bytes, token_layout.h). It copies
// in two phases through shared memory: stage every source token of the tile
// (16-byte vectors where alignment allows), then write every destination.
// Parallelism comes from rows x tiles (B*H = 8 rows at 32k tokens and C = 64
// is 4096 CTAs), not from rows alone.
//
// The hazard. compact_ maps destination j to source s(j) = keep_idx[j]; since
// keep_idx is strictly increasing in [0, T), s(j) >= j and s is increasing.
// Positions a tile writes, [a, e), can be
//   - sources of the same tile: harmless, the tile stages all its sources
//     before it writes (block barrier between the phases);
//   - sources of a later tile: impossible, a later tile reads s(j'') >= j'' >= e;
//   - sources of an earlier tile t' < t: the only hazard. Those readers are the
//     j' < a with s(j') in [a, e); s is increasing, so they form a range that
//     starts at lower_bound(s, a) (a binary search over [0, a], as s(a) >= a).
// Tiles never read what earlier tiles write (earlier tiles write below a <= s(j)).
// Hence the ordering rule: a tile may write once every earlier tile of its row
// holding one of its readers has finished staging. Each tile publishes a
// "staged" flag right after its staging phase (a fence, then the flag; before
// it waits on anything), then spins on the flags of the tiles holding its
// readers, then writes. Waits only point to lower tiles, and a tile's staging
// waits on nothing, so the lowest unfinished tile always makes progress,
// provided every lower tile is already running: CTAs therefore take tiles from
// an atomic ticket (tile-major, so rows interleave) rather than from
// blockIdx, whose scheduling order CUDA does not promise.
//
// The untouched prefix: s(j) = j means j needs no move, and since s(j) - j is
// non-decreasing those j form a prefix; a tile whose last destination is its own
// source is entirely in it and exits after one index load (no other tile reads
// its positions: earlier tiles read positions below a, later ones above e).
// Tokens with s(j) = j inside a moving tile are skipped too.
//
// move_ is the same kernel with s(j) = j + (src_start - dst_start): a move down
// walks destinations upward, a move up is the mirror image (logical index j is
// the j-th destination from the top), so "readers precede writers" holds in both.
//
// Scratch memory: one int32 flag per tile plus a ticket, i.e. (B*H*K / C + 1) * 4
// bytes, far below keep_idx itself; nothing proportional to the moved bytes.
//
// Validation (validate=True): a kernel flags any out-of-range or non-increasing
// index in one int32, read back with one sync; if set, the CPU validator rebuilds
// the exact message (same text as the CPU backend) from a host copy of keep_idx.
// With validate=False the kernel still never touches memory outside [0, T) (an
// out-of-range index is skipped), but bad indices give unspecified contents.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvcompact/token_args.h"
#include "kvcompact/token_layout.h"

namespace kvcompact {
namespace {

constexpr int kMaxTensorsPerLaunch = 8;
constexpr int kThreads = 256;
constexpr int64_t kTileBytes = 32 * 1024;      // staged bytes per CTA (all tensors)
constexpr int64_t kMaxTileTokens = 256;        // bounds the shared index arrays
// Opt-in dynamic shared memory cap: sm_89 allows 99 KiB per block in all.
constexpr int64_t kMaxStageBytes = 88 * 1024;

struct LaunchTensors {
  TokenLayout t[kMaxTensorsPerLaunch];
  int32_t stage_off[kMaxTensorsPerLaunch];  // byte offset of each tensor's staging area
  int n = 0;
};

struct TileGeometry {
  int64_t rows, H, T;
  int64_t count;  // logical destinations per row (K, or the move length)
  int64_t tile;   // destinations per tile (C)
  int64_t tiles;  // tiles per row
};

// compact_: destination j <- source keep_idx[b, h, j].
struct GatherMap {
  const int64_t* keep;
  int64_t kb, kh, kk, H;

  struct Row {
    const int64_t* k;
    int64_t kk;
    __device__ int64_t dst(int64_t j) const { return j; }
    __device__ int64_t src(int64_t j) const { return k[j * kk]; }
    // Whole tile [a, e) in the untouched prefix.
    __device__ bool identity(int64_t a, int64_t e) const { return k[(e - 1) * kk] == e - 1; }
    // First logical index < a that reads a position in [a, e); a if none.
    __device__ int64_t first_reader(int64_t a, int64_t e) const {
      int64_t lo = 0, hi = a;  // lower_bound(s, a) lies in [0, a] because s(a) >= a
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (k[mid * kk] < a) lo = mid + 1; else hi = mid;
      }
      return (lo < a && k[lo * kk] < e) ? lo : a;
    }
  };

  __device__ Row row(int64_t r) const {
    const int64_t b = r / H, h = r % H;
    return Row{keep + b * kb + h * kh, kk};
  }
};

// move_: destination dst_start + i <- source src_start + i, walked from the
// side that keeps readers ahead of writers.
struct ShiftMap {
  int64_t src_start, dst_start, count, dist;  // dist = |src_start - dst_start| > 0
  bool upward;                                // dst_start > src_start

  __device__ int64_t dst(int64_t j) const {
    return upward ? dst_start + count - 1 - j : dst_start + j;
  }
  __device__ int64_t src(int64_t j) const {
    return upward ? src_start + count - 1 - j : src_start + j;
  }
  __device__ bool identity(int64_t, int64_t) const { return false; }
  // The position written by logical j is read by logical j - dist.
  __device__ int64_t first_reader(int64_t a, int64_t e) const {
    if (e - dist <= 0) return a;
    const int64_t first = a - dist > 0 ? a - dist : 0;
    return first < a ? first : a;
  }
  __device__ const ShiftMap& row(int64_t) const { return *this; }
};

// Stages (kLoad) or writes back one tensor's tokens of the tile in V-sized
// words. Each thread handles kUnroll words per step and issues all their global
// loads before any dependent store, so enough bytes are in flight per SM to
// cover DRAM latency at half occupancy.
template <typename V, bool kLoad>
__device__ void copy_tile_words(const TokenLayout& L, unsigned char* stage, char* row_base,
                                const int64_t* s_src, const int64_t* s_dst, int ntok) {
  constexpr int kUnroll = 4;
  const unsigned per_chunk = static_cast<unsigned>(L.chunk_bytes / sizeof(V));
  const unsigned per_token = per_chunk * static_cast<unsigned>(L.chunks);
  const unsigned total = per_token * static_cast<unsigned>(ntok);
  V* sm = reinterpret_cast<V*>(stage);
  for (unsigned base = threadIdx.x; base < total; base += kUnroll * blockDim.x) {
    V* global[kUnroll];
    V word[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const unsigned u = base + k * blockDim.x;
      global[k] = nullptr;
      if (u >= total) continue;
      const unsigned tok = u / per_token;
      const int64_t pos = kLoad ? s_src[tok] : s_dst[tok];
      if (pos < 0) continue;  // token needs no move (or an invalid index was skipped)
      const unsigned rem = u - tok * per_token;
      int64_t off;
      if (L.chunks == 1) {
        off = static_cast<int64_t>(rem) * sizeof(V);
      } else {
        const unsigned c = rem / per_chunk;
        off = L.chunk_offset(c) + static_cast<int64_t>(rem - c * per_chunk) * sizeof(V);
      }
      global[k] = reinterpret_cast<V*>(row_base + pos * L.stride_t + off);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (global[k] != nullptr) word[k] = kLoad ? *global[k] : sm[base + k * blockDim.x];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (global[k] == nullptr) continue;
      if (kLoad) {
        sm[base + k * blockDim.x] = word[k];
      } else {
        *global[k] = word[k];
      }
    }
  }
}

template <bool kLoad>
__device__ void copy_tile(const TokenLayout& L, unsigned char* stage, int64_t b, int64_t h,
                          const int64_t* s_src, const int64_t* s_dst, int ntok) {
  char* row_base = L.data + b * L.stride_b + h * L.stride_h;
  switch (L.vec) {
    case 16: copy_tile_words<uint4, kLoad>(L, stage, row_base, s_src, s_dst, ntok); break;
    case 8: copy_tile_words<uint2, kLoad>(L, stage, row_base, s_src, s_dst, ntok); break;
    case 4: copy_tile_words<uint32_t, kLoad>(L, stage, row_base, s_src, s_dst, ntok); break;
    case 2: copy_tile_words<uint16_t, kLoad>(L, stage, row_base, s_src, s_dst, ntok); break;
    default: copy_tile_words<uint8_t, kLoad>(L, stage, row_base, s_src, s_dst, ntok); break;
  }
}

// ~110 registers (no spills at sm_90): 2 CTAs per SM, i.e. 512 threads x 4
// words x 16 B = 32 KiB of loads in flight per SM. Forcing 3 CTAs spills.
template <class Map>
__global__ void __launch_bounds__(kThreads)
    tiled_move_kernel(const __grid_constant__ LaunchTensors ts, const TileGeometry geo,
                      const Map map, int* __restrict__ flags, unsigned int* __restrict__ ticket) {
  extern __shared__ __align__(16) unsigned char stage[];
  __shared__ int64_t s_src[kMaxTileTokens];  // -1: nothing to move for this token
  __shared__ int64_t s_dst[kMaxTileTokens];
  __shared__ unsigned int s_ticket;
  __shared__ bool s_identity;

  if (threadIdx.x == 0) s_ticket = atomicAdd(ticket, 1u);
  __syncthreads();
  const int64_t id = s_ticket;
  const int64_t tile = id / geo.rows, r = id % geo.rows;  // tile-major: rows interleave
  const int64_t b = r / geo.H, h = r % geo.H;
  const int64_t a = tile * geo.tile;
  const int64_t e = a + geo.tile < geo.count ? a + geo.tile : geo.count;
  const int ntok = static_cast<int>(e - a);
  const auto row = map.row(r);
  int* row_flags = flags + r * geo.tiles;

  if (threadIdx.x == 0) s_identity = row.identity(a, e);
  for (int i = threadIdx.x; i < ntok; i += blockDim.x) {
    const int64_t s = row.src(a + i), d = row.dst(a + i);
    const bool move = s != d && s >= 0 && s < geo.T;
    s_src[i] = move ? s : -1;
    s_dst[i] = move ? d : -1;
  }
  __syncthreads();
  if (s_identity) {
    if (threadIdx.x == 0) atomicExch(row_flags + tile, 1);
    return;
  }

  // Phase 1: stage every source of the tile.
  for (int i = 0; i < ts.n; ++i) {
    copy_tile<true>(ts.t[i], stage + ts.stage_off[i], b, h, s_src, s_dst, ntok);
  }
  __syncthreads();

  // Publish "staged", then wait for earlier tiles that read what we overwrite.
  if (threadIdx.x == 0) {
    __threadfence();
    atomicExch(row_flags + tile, 1);
    const int64_t first = row.first_reader(a, e);
    for (int64_t t = first / geo.tile; t < tile; ++t) {
      volatile int* f = row_flags + t;
      while (*f == 0) __nanosleep(64);
    }
    __threadfence();
  }
  __syncthreads();

  // Phase 2: write every destination.
  for (int i = 0; i < ts.n; ++i) {
    copy_tile<false>(ts.t[i], stage + ts.stage_off[i], b, h, s_src, s_dst, ntok);
  }
}

__global__ void validate_keep_idx_kernel(const int64_t* __restrict__ keep, int64_t kb,
                                         int64_t kh, int64_t kk, int64_t H, int64_t K,
                                         int64_t T, int64_t total, int* __restrict__ bad) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / K, j = i % K, b = r / H, h = r % H;
    const int64_t* row = keep + b * kb + h * kh;
    const int64_t v = row[j * kk];
    if (v < 0 || v >= T || (j > 0 && row[(j - 1) * kk] >= v)) *bad = 1;
  }
}

inline int64_t round_up16(int64_t x) { return (x + 15) / 16 * 16; }

// Packs the group's tensors into launches (normally one) and runs the tiled
// kernel for each.
template <class Map>
void launch_tiled(const char* op, const TokenGroup& g, const Map& map, int64_t count) {
  const int64_t rows = g.B * g.H;
  const auto stream = c10::cuda::getCurrentCUDAStream(g.device.index());

  std::vector<std::vector<int>> batches;
  int64_t batch_bytes = 0;
  for (int i = 0; i < static_cast<int>(g.layouts.size()); ++i) {
    const int64_t tb = g.layouts[i].token_bytes();
    TORCH_CHECK_VALUE(round_up16(tb) <= kMaxStageBytes, op, ": a token of one of `tensors` holds ",
                      tb, " bytes per (b, h); the CUDA kernel supports at most ", kMaxStageBytes);
    if (batches.empty() || batches.back().size() == kMaxTensorsPerLaunch ||
        batch_bytes + tb > kTileBytes) {
      batches.emplace_back();
      batch_bytes = 0;
    }
    batches.back().push_back(i);
    batch_bytes += tb;
  }

  for (const auto& batch : batches) {
    int64_t per_token = 0;
    for (int i : batch) per_token += g.layouts[i].token_bytes();
    int64_t tile = std::max<int64_t>(1, std::min(kMaxTileTokens, kTileBytes / per_token));
    tile = std::min(tile, count);
    LaunchTensors ts;
    int64_t stage_bytes = 0;
    for (int i : batch) {
      ts.t[ts.n] = g.layouts[i];
      ts.stage_off[ts.n] = static_cast<int32_t>(stage_bytes);
      stage_bytes += round_up16(tile * g.layouts[i].token_bytes());
      ++ts.n;
    }
    const int64_t tiles = (count + tile - 1) / tile;
    const TileGeometry geo{rows, g.H, g.T, count, tile, tiles};
    // [0]: ticket; then one "staged" flag per (row, tile).
    at::Tensor scratch = at::zeros({1 + rows * tiles},
                                   at::TensorOptions().dtype(at::kInt).device(g.device));
    int* flags = scratch.data_ptr<int>();
    auto kernel = &tiled_move_kernel<Map>;
    // The 48 KiB default covers static + dynamic shared memory (the index arrays
    // take 4 KiB), so opt in before the staging area alone gets close to it.
    if (stage_bytes > 40 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(stage_bytes)));
    }
    const int64_t ctas = rows * tiles;
    TORCH_CHECK(ctas < (int64_t{1} << 31), op, ": too many tiles (", ctas, ")");
    kernel<<<static_cast<unsigned>(ctas), kThreads, stage_bytes, stream>>>(
        ts, geo, map, flags + 1, reinterpret_cast<unsigned int*>(flags));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void compact_cuda(at::TensorList tensors, const at::Tensor& keep_idx, bool validate) {
  const TokenGroup g = check_token_tensors("compact_", tensors);
  const int64_t K = check_keep_idx_meta("compact_", keep_idx, g);
  const c10::cuda::CUDAGuard guard(g.device);
  const int64_t rows = g.B * g.H;
  const int64_t* keep = keep_idx.const_data_ptr<int64_t>();
  if (validate && rows * K > 0) {
    at::Tensor bad = at::zeros({1}, keep_idx.options().dtype(at::kInt));
    const int64_t total = rows * K;
    const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 4096));
    validate_keep_idx_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream(g.device.index())>>>(
        keep, keep_idx.stride(0), keep_idx.stride(1), keep_idx.stride(2), g.H, K, g.T, total,
        bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (bad.item<int>() != 0) {  // the one sync; the message comes from the host validator
      validate_keep_idx_host("compact_", keep_idx.cpu(), g.T);
      TORCH_CHECK(false, "compact_: the device found an invalid `keep_idx` the host did not");
    }
  }
  if (rows == 0 || K == 0 || g.layouts.empty()) return;
  const GatherMap map{keep, keep_idx.stride(0), keep_idx.stride(1), keep_idx.stride(2), g.H};
  launch_tiled("compact_", g, map, K);
}

void move_cuda(at::TensorList tensors, int64_t src_start, int64_t src_end, int64_t dst_start) {
  const TokenGroup g = check_token_tensors("move_", tensors);
  check_move_range("move_", g.T, src_start, src_end, dst_start);
  const int64_t count = src_end - src_start;
  if (count == 0 || src_start == dst_start || g.B * g.H == 0 || g.layouts.empty()) return;
  const c10::cuda::CUDAGuard guard(g.device);
  const bool upward = dst_start > src_start;
  const ShiftMap map{src_start, dst_start, count,
                     upward ? dst_start - src_start : src_start - dst_start, upward};
  launch_tiled("move_", g, map, count);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CUDA, m) {
  m.impl("compact_", &compact_cuda);
  m.impl("move_", &move_cuda);
}

}  // namespace kvcompact

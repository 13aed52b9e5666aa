// CUDA decode attention over cache storage (model-dtype or 8-bit codes).
//
// Strategy (flash-decoding). The op is a few query rows against a long K/V, so
// it is bound by reading K and V once; the kernels are shaped around that:
//  * Work: a CTA (128 threads, 4 warps) owns one (batch, KV head, row block, KV
//    split). A row block is up to RB = 4 or 8 of the n_rep * Q query rows that
//    read the KV head (GQA), so each K/V byte of a split is read once for all
//    of them (R > 8 takes several row blocks). Splits of the visible range
//    (a multiple of 32 rows, at least kMinSplitRows) are chosen so the grid has
//    about kCtasPerSm CTAs per SM; with one split the CTA writes out/lse
//    itself, otherwise it writes unnormalized partials (acc, max, sum) and a
//    merge kernel combines the splits by log-sum-exp, the CPU kernel's rule.
//  * A split is walked in tiles of 32 KV rows. Fast path: the tile's raw bytes
//    (codes and scales, or fp16/bf16/fp32 values) are copied to shared memory
//    with 16-byte cp.async, double-buffered (the next tile is in flight while
//    this one is computed) when both stages fit in 48 KiB, else one stage.
//    Each element is decoded (quant_math_cuda.cuh's decode_device, exact) and
//    scaled exactly once per CTA:
//      scores: lane j takes tile row j, warp w the 16-byte units u = w mod 4 of
//        it: it decodes the unit, dots it with the RB query rows (fp32, shared,
//        broadcast loads) and the 4 warps' partial dots meet in shared memory;
//        row pitches are an odd number of 16-byte units, so the 32 lanes' loads
//        of 32 different rows hit distinct banks.
//      softmax: warp w finishes rows r = w mod 4: scale, softcap, causal and
//        window mask, then an online-softmax update of the row's running max
//        and sum (shuffle reductions; a NaN score makes the row NaN).
//      values: warp w takes tile rows j = w mod 4, lane l the 4-element quads
//        l + 32 i of the row, and accumulates p[r][j] * v[j] for all RB rows in
//        registers (RB x W / 32 floats per thread, W = 128 or 256); the warps'
//        partial sums are added in shared memory at the end of the split.
//    As on the CPU, a weight that is exactly 0 (masked row) never multiplies a
//    value, so a NaN/Inf value in a row nobody sees cannot poison the output.
//  * Fallback path (D > 256, D * elem not a multiple of 16, group sizes not a
//    multiple of 16, unaligned or oddly strided views): the same compute on
//    fp32 tiles that a synchronous element-wise load fills (decode * scale);
//    K is consumed in column chunks of 128 and each CTA produces a 128-column
//    slice of the output, so any head dim works with bounded shared memory.
// Query rows are converted to contiguous fp32 on the host (small); K/V/scales
// need a contiguous last dim (copied on the host otherwise, like the CPU).
// Everything accumulates in fp32 with expf/tanhf/logf (no fast math); the
// result matches kvcompact.reference.decode_attention to fp32 rounding, not
// bit for bit (summation order). Kernels run on the current stream of the
// query's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>

#include "kvcompact/attention_args.h"
#include "kvcompact/attention_merge.h"
#include "kvcompact/quant_math.h"
#include "kvcompact/quant_math_cuda.cuh"
#include "kvcompact/vec.h"

namespace kvcompact {
namespace {

constexpr int kThreads = 128;               // threads per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;                   // KV rows per step: one per lane in the score phase
constexpr int kUnitBytes = 16;              // one cp.async / one score-phase shared load
constexpr int kFallbackWidth = 128;         // fallback K chunk / output slice width (columns)
constexpr int kMaxFastDim = 256;            // fast path head dims
constexpr int64_t kMinSplitRows = 128;      // shorter splits cost more to merge than they save
constexpr int kCtasPerSm = 4;               // grid target
constexpr int kMaxSplits = 256;             // bounds the merge kernel's weight buffer
constexpr int kMergeRows = kThreads / 32;   // merge: one warp per output row
constexpr int kDefaultSmem = 48 * 1024;     // dynamic shared memory without opt-in
constexpr unsigned kFullMask = 0xffffffffu;

using Kind = KVStorage;  // how K/V rows are stored (attention_args.h)

template <Kind K>
struct KindInfo {
  static constexpr int kBytes = K == Kind::kF32 ? 4 : (K == Kind::kF16 || K == Kind::kBF16) ? 2 : 1;
  static constexpr bool kQuant = K == Kind::kE4M3 || K == Kind::kE5M2 || K == Kind::kInt8;
  static constexpr int kPerWord = 4 / kBytes;            // elements per 32-bit word
  static constexpr int kPerUnit = kUnitBytes / kBytes;   // elements per 16-byte unit
};

struct AttnParams {
  const float* q;  // [B * Hkv * R, D] fp32 contiguous (row (b * Hkv + hk) * R + r)
  const unsigned char* k;
  const unsigned char* v;
  const float* kscale;
  const float* vscale;
  float* out;       // [B * Hkv * R, D]
  float* lse;       // [B * Hkv * R]
  float* acc_part;  // [B * Hkv, splits, R, D] (splits > 1)
  float* m_part;    // [B * Hkv, splits, R]
  float* l_part;
  int64_t k_stride[3], v_stride[3];    // bytes, over (B, Hkv, T); the last dim is contiguous
  int64_t ks_stride[3], vs_stride[3];  // floats, over (B, Hkv, T)
  int64_t kv_len, query_start, window;
  int64_t u0, u1;     // rows any query sees: [u0, u1)
  int64_t split_len;  // multiple of kTile
  int kv_heads, q_len, rows, head_dim;
  int group_size, groups;
  int row_blocks, slices, splits;
  int direct;    // splits == 1: write out/lse, not partials
  int stages;    // fast path: 1 or 2 tile buffers
  int src_kind;  // fallback: Kind of the stored K/V
  float scale, softcap;
  // shared memory layout (bytes)
  int units;        // fast path: 16-byte units per K/V row (D * elem / 16)
  int row_pitch;    // bytes per tile row (odd number of 16-byte units)
  int scale_pitch;  // floats per scale row (odd)
  int q_pitch;      // floats per query row in shared memory
  int tile_bytes;   // one K or V tile: kTile * row_pitch
  int scale_tile_bytes;
  int off_scales, off_q, off_red, off_p, off_alpha;
};

// ---------------------------------------------------------------------------
// small device helpers

__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_nan_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Butterfly sum: every lane ends with the same bits (a + b == b + a).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float neg_inf() { return -std::numeric_limits<float>::infinity(); }

// attention_row_range (attention_args.h) on the device.
__device__ __forceinline__ void row_range(const AttnParams& p, int64_t i, int64_t* lo, int64_t* hi) {
  const int64_t qpos = p.query_start + i;
  const int64_t end = qpos + 1;
  const int64_t begin = p.window > 0 ? qpos - p.window + 1 : 0;
  *lo = begin < 0 ? 0 : begin;
  *hi = end > p.kv_len ? p.kv_len : end;
}

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<float*>(smem_dst) = *reinterpret_cast<const float*>(gmem_src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// One 8-bit code to its exact float value.
template <Kind K>
__device__ __forceinline__ float decode_code(uint32_t byte) {
  if constexpr (K == Kind::kE4M3) {
    return decode_device<QuantFormat::kFp8E4M3>(static_cast<uint8_t>(byte));
  } else if constexpr (K == Kind::kE5M2) {
    return decode_device<QuantFormat::kFp8E5M2>(static_cast<uint8_t>(byte));
  } else {
    return static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(byte)));
  }
}

// The KindInfo<K>::kPerWord elements of one little-endian 32-bit word, unscaled.
template <Kind K>
__device__ __forceinline__ void decode_word(uint32_t w, float* out) {
  if constexpr (K == Kind::kF32) {
    out[0] = __uint_as_float(w);
  } else if constexpr (K == Kind::kF16) {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  } else if constexpr (K == Kind::kBF16) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  } else {
#pragma unroll
    for (int b = 0; b < 4; ++b) out[b] = decode_code<K>((w >> (8 * b)) & 0xffu);
  }
}

// Four consecutive elements at `ptr` (shared memory, aligned to 4 elements).
template <Kind K>
__device__ __forceinline__ void load_quad(const unsigned char* ptr, float (&v)[4]) {
  if constexpr (KindInfo<K>::kBytes == 4) {
    const uint4 x = *reinterpret_cast<const uint4*>(ptr);
    decode_word<K>(x.x, v + 0);
    decode_word<K>(x.y, v + 1);
    decode_word<K>(x.z, v + 2);
    decode_word<K>(x.w, v + 3);
  } else if constexpr (KindInfo<K>::kBytes == 2) {
    const uint2 x = *reinterpret_cast<const uint2*>(ptr);
    decode_word<K>(x.x, v + 0);
    decode_word<K>(x.y, v + 2);
  } else {
    decode_word<K>(*reinterpret_cast<const uint32_t*>(ptr), v);
  }
}

// One element of global memory (fallback loads).
template <Kind K>
__device__ __forceinline__ float load_elem(const unsigned char* ptr) {
  if constexpr (K == Kind::kF32) {
    return *reinterpret_cast<const float*>(ptr);
  } else if constexpr (K == Kind::kF16) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(ptr)));
  } else if constexpr (K == Kind::kBF16) {
    return __uint_as_float(static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(ptr)) << 16);
  } else {
    return decode_code<K>(*ptr);
  }
}

// ---------------------------------------------------------------------------
// phases of the split kernel

// Query rows [nb * RB, nb * RB + RB) of KV head bh, columns [c0, c0 + cw), to q_s
// [RB][q_pitch] fp32; rows past R and columns past cw are zero.
template <int RB>
__device__ __forceinline__ void load_queries(const AttnParams& p, float* q_s, int64_t bh, int nb, int c0,
                                             int cw) {
  for (int idx = threadIdx.x; idx < RB * p.q_pitch; idx += kThreads) {
    const int r = idx / p.q_pitch;
    const int c = idx - r * p.q_pitch;
    const int rg = nb * RB + r;
    float x = 0.0f;
    if (rg < p.rows && c < cw) x = p.q[(bh * p.rows + rg) * p.head_dim + c0 + c];
    q_s[idx] = x;
  }
}

// Fast path: queue the copies of tile rows [t0, t0 + n) of K, V (and their
// scales) into buffer `buf`, as one cp.async group.
template <Kind K>
__device__ __forceinline__ void issue_tile(const AttnParams& p, unsigned char* smem, int buf,
                                           const unsigned char* kbase, const unsigned char* vbase,
                                           const float* ksbase, const float* vsbase, int64_t t0, int n) {
  unsigned char* kt = smem + (2 * buf) * p.tile_bytes;
  unsigned char* vt = kt + p.tile_bytes;
  const int per = n * p.units;
  for (int idx = threadIdx.x; idx < 2 * per; idx += kThreads) {
    const bool is_v = idx >= per;
    const int rem = is_v ? idx - per : idx;
    const int j = rem / p.units;
    const int u = rem - j * p.units;
    const unsigned char* src = is_v ? vbase + (t0 + j) * p.v_stride[2] : kbase + (t0 + j) * p.k_stride[2];
    unsigned char* dst = (is_v ? vt : kt) + j * p.row_pitch;
    cp_async16(dst + u * kUnitBytes, src + u * kUnitBytes);
  }
  if constexpr (KindInfo<K>::kQuant) {
    float* kst = reinterpret_cast<float*>(smem + p.off_scales + (2 * buf) * p.scale_tile_bytes);
    float* vst = reinterpret_cast<float*>(smem + p.off_scales + (2 * buf + 1) * p.scale_tile_bytes);
    const int sper = n * p.groups;
    for (int idx = threadIdx.x; idx < 2 * sper; idx += kThreads) {
      const bool is_v = idx >= sper;
      const int rem = is_v ? idx - sper : idx;
      const int j = rem / p.groups;
      const int g = rem - j * p.groups;
      const float* src = is_v ? vsbase + (t0 + j) * p.vs_stride[2] : ksbase + (t0 + j) * p.ks_stride[2];
      float* dst = (is_v ? vst : kst) + j * p.scale_pitch;
      cp_async4(dst + g, src + g);
    }
  }
  cp_async_commit();
}

// Fallback: tile rows [t0, t0 + n), columns [c0, c0 + cw) of one tensor, decoded
// and scaled, to dst [kTile][pitch_f] fp32; rows >= n and columns in [cw, cwp) are 0.
template <Kind S>
__device__ __forceinline__ void fallback_load(float* dst, int pitch_f, const unsigned char* base,
                                              int64_t stride_t, const float* sbase, int64_t sstride_t,
                                              int group_size, int64_t t0, int n, int c0, int cw, int cwp) {
  constexpr int kB = KindInfo<S>::kBytes;
  for (int idx = threadIdx.x; idx < kTile * cwp; idx += kThreads) {
    const int j = idx / cwp;
    const int c = idx - j * cwp;
    float x = 0.0f;
    if (j < n && c < cw) {
      const int64_t t = t0 + j;
      const int d = c0 + c;
      x = load_elem<S>(base + t * stride_t + int64_t{d} * kB);
      if constexpr (KindInfo<S>::kQuant) x *= sbase[t * sstride_t + d / group_size];
    }
    dst[j * pitch_f + c] = x;
  }
}

__device__ __forceinline__ void fallback_load_any(int kind, float* dst, int pitch_f, const unsigned char* base,
                                                  int64_t stride_t, const float* sbase, int64_t sstride_t,
                                                  int group_size, int64_t t0, int n, int c0, int cw, int cwp) {
  switch (static_cast<Kind>(kind)) {
    case Kind::kF32:
      fallback_load<Kind::kF32>(dst, pitch_f, base, stride_t, sbase, sstride_t, group_size, t0, n, c0, cw, cwp);
      break;
    case Kind::kF16:
      fallback_load<Kind::kF16>(dst, pitch_f, base, stride_t, sbase, sstride_t, group_size, t0, n, c0, cw, cwp);
      break;
    case Kind::kBF16:
      fallback_load<Kind::kBF16>(dst, pitch_f, base, stride_t, sbase, sstride_t, group_size, t0, n, c0, cw, cwp);
      break;
    case Kind::kE4M3:
      fallback_load<Kind::kE4M3>(dst, pitch_f, base, stride_t, sbase, sstride_t, group_size, t0, n, c0, cw, cwp);
      break;
    case Kind::kE5M2:
      fallback_load<Kind::kE5M2>(dst, pitch_f, base, stride_t, sbase, sstride_t, group_size, t0, n, c0, cw, cwp);
      break;
    case Kind::kInt8:
      fallback_load<Kind::kInt8>(dst, pitch_f, base, stride_t, sbase, sstride_t, group_size, t0, n, c0, cw, cwp);
      break;
  }
}

// Partial dots of tile row `lane` with the RB query rows over the 16-byte units
// u = warp, warp + 4, ... < nunits of the tile (K stored as K, scaled by the
// row's group scales when kQuant).
template <Kind K, bool kQuant, int RB>
__device__ __forceinline__ void score_units(const unsigned char* ktile, const float* kscales, const float* q_s,
                                            int q_pitch, int nunits, int row_pitch, int scale_pitch,
                                            int group_size, int lane, int warp, float (&s)[RB]) {
  constexpr int kVE = KindInfo<K>::kPerUnit;
  constexpr int kPW = KindInfo<K>::kPerWord;
  const unsigned char* row = ktile + lane * row_pitch;
  for (int u = warp; u < nunits; u += kWarps) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + u * kUnitBytes);
    float kv[kVE];
    decode_word<K>(raw.x, kv + 0 * kPW);
    decode_word<K>(raw.y, kv + 1 * kPW);
    decode_word<K>(raw.z, kv + 2 * kPW);
    decode_word<K>(raw.w, kv + 3 * kPW);
    if constexpr (kQuant) {
      // G % 16 == 0 on the fast path: the unit lies in one group.
      const float sc = kscales[lane * scale_pitch + (u * kVE) / group_size];
#pragma unroll
      for (int e = 0; e < kVE; ++e) kv[e] *= sc;
    }
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const float4* qr = reinterpret_cast<const float4*>(q_s + r * q_pitch + u * kVE);
      float a = s[r];
#pragma unroll
      for (int e = 0; e < kVE / 4; ++e) {
        const float4 qv = qr[e];
        a = fmaf(qv.x, kv[4 * e + 0], a);
        a = fmaf(qv.y, kv[4 * e + 1], a);
        a = fmaf(qv.z, kv[4 * e + 2], a);
        a = fmaf(qv.w, kv[4 * e + 3], a);
      }
      s[r] = a;
    }
  }
}

// Scores of the warp's rows r = warp + 4 k against tile rows [t0, t0 + n), the
// online-softmax update of their running max m and sum l, and the weights p
// (p_s [kTile][RB]) and rescale factors (alpha_s [RB]) for the value phase.
template <int RB>
__device__ __forceinline__ void softmax_step(const AttnParams& p, const float* red_s, float* p_s, float* alpha_s,
                                             int lane, int warp, int64_t t0, int n,
                                             const int64_t (&lo)[RB / kWarps], const int64_t (&hi)[RB / kWarps],
                                             float (&m)[RB / kWarps], float (&l)[RB / kWarps]) {
#pragma unroll
  for (int k = 0; k < RB / kWarps; ++k) {
    const int r = warp + kWarps * k;
    float x = red_s[(0 * RB + r) * kTile + lane];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) x += red_s[(w * RB + r) * kTile + lane];
    x *= p.scale;
    if (p.softcap > 0.0f) x = p.softcap * tanhf(x / p.softcap);
    const int64_t t = t0 + lane;
    const bool visible = lane < n && t >= lo[k] && t < hi[k];
    x = visible ? x : neg_inf();
    const float bmax = warp_nan_max(x);  // the same in every lane
    float prob = 0.0f, alpha = 1.0f;
    if (bmax != neg_inf()) {  // else: the row sees nothing here; its state is unchanged
      const float new_max = nan_max(m[k], bmax);
      alpha = expf(m[k] - new_max);  // 0 while m is -inf; NaN once the row is NaN
      prob = expf(x - new_max);      // 0 for masked rows
      l[k] = l[k] * alpha + warp_sum(prob);
      m[k] = new_max;
    }
    p_s[lane * RB + r] = prob;
    if (lane == 0) alpha_s[r] = alpha;
  }
}

// acc[r][i] = acc[r][i] * alpha[r] + sum_j p[j][r] * v[j][quad l + 32 i] over the
// warp's tile rows j = warp, warp + 4, ... < n.
template <Kind K, bool kQuant, int RB, int kQuads>
__device__ __forceinline__ void value_step(const unsigned char* vtile, const float* vscales, const float* p_s,
                                           const float* alpha_s, int row_pitch, int scale_pitch,
                                           const int (&gq)[kQuads], int nq, int n, int lane, int warp,
                                           float (&acc)[RB][kQuads][4]) {
  constexpr int kB = KindInfo<K>::kBytes;
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const float a = alpha_s[r];
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][i][c] *= a;
    }
  }
  for (int j = warp; j < n; j += kWarps) {
    float pr[RB];
#pragma unroll
    for (int r4 = 0; r4 < RB / 4; ++r4) {
      const float4 x = reinterpret_cast<const float4*>(p_s + j * RB)[r4];
      pr[4 * r4 + 0] = x.x;
      pr[4 * r4 + 1] = x.y;
      pr[4 * r4 + 2] = x.z;
      pr[4 * r4 + 3] = x.w;
    }
    const unsigned char* row = vtile + j * row_pitch;
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const int qd = lane + 32 * i;
      if (qd < nq) {
        float v[4];
        load_quad<K>(row + qd * 4 * kB, v);
        if constexpr (kQuant) {
          const float sc = vscales[j * scale_pitch + gq[i]];
#pragma unroll
          for (int c = 0; c < 4; ++c) v[c] *= sc;
        }
        // x * 0 is NaN exactly for NaN/Inf (or an overflowing sum: harmless, it only
        // takes the careful branch). A zero weight must not meet a NaN/Inf value.
        const float probe = (v[0] + v[1] + v[2] + v[3]) * 0.0f;
        if (probe == 0.0f) {
#pragma unroll
          for (int r = 0; r < RB; ++r) {
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][i][c] = fmaf(pr[r], v[c], acc[r][i][c]);
          }
        } else {
#pragma unroll
          for (int r = 0; r < RB; ++r) {
            if (pr[r] != 0.0f) {
#pragma unroll
              for (int c = 0; c < 4; ++c) acc[r][i][c] = fmaf(pr[r], v[c], acc[r][i][c]);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// the split kernel
//
// Grid: x = ((b * Hkv + hk) * row_blocks + nb) * slices + slice, y = split.
// K: how K/V sit in shared memory (the stored kind on the fast path; kF32,
// decoded and scaled, on the fallback). W: output columns per CTA (a multiple
// of 128); RB: query rows per CTA (a multiple of 4).
template <Kind K, int W, int RB, bool kFallback>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const AttnParams p) {
  static_assert(RB % kWarps == 0 && RB % 4 == 0, "RB: a multiple of 4 and of the warp count");
  static_assert(W % 128 == 0, "W: a multiple of 128");
  static_assert(!kFallback || (K == Kind::kF32 && W == kFallbackWidth),
                "the fallback computes on fp32 tiles, kFallbackWidth columns per CTA");
  constexpr int kOwn = RB / kWarps;  // rows whose softmax state a warp keeps
  constexpr int kQuads = W / 128;    // 4-column quads per lane in the value phase
  constexpr bool kQuant = !kFallback && KindInfo<K>::kQuant;

  extern __shared__ __align__(16) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem + p.off_q);          // [RB][q_pitch]
  float* red_s = reinterpret_cast<float*>(smem + p.off_red);      // [kWarps][RB][kTile]
  float* p_s = reinterpret_cast<float*>(smem + p.off_p);          // [kTile][RB]
  float* alpha_s = reinterpret_cast<float*>(smem + p.off_alpha);  // [RB]

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  int64_t bx = blockIdx.x;
  const int slice = static_cast<int>(bx % p.slices);
  bx /= p.slices;
  const int nb = static_cast<int>(bx % p.row_blocks);
  const int64_t bh = bx / p.row_blocks;
  const int64_t b = bh / p.kv_heads, hk = bh % p.kv_heads;
  const int split = static_cast<int>(blockIdx.y);
  const int D = p.head_dim;
  const int col0 = slice * W;                                 // this CTA's output columns
  const int vw = D - col0 < W ? D - col0 : W;                 // [col0, col0 + vw)
  const int nq = (vw + 3) / 4;                                // quads of them

  // The split's rows, and each query row's visible part of it.
  const int64_t s0 = p.u0 + int64_t{split} * p.split_len;
  const int64_t s1 = p.u1 < s0 + p.split_len ? p.u1 : s0 + p.split_len;
  int64_t lo[kOwn], hi[kOwn];
  int64_t c_lo = s1, c_hi = s0;  // union over the CTA's rows
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const int rg = nb * RB + r;
    int64_t a = 0, e = 0;
    if (rg < p.rows) {
      row_range(p, rg % p.q_len, &a, &e);
      a = a > s0 ? a : s0;
      e = e < s1 ? e : s1;
    }
    if (a < e) {
      c_lo = a < c_lo ? a : c_lo;
      c_hi = e > c_hi ? e : c_hi;
    } else {
      a = 0;
      e = 0;
    }
    if (r % kWarps == warp) {
      lo[r / kWarps] = a;
      hi[r / kWarps] = e;
    }
  }
  const int ntiles = c_lo < c_hi ? static_cast<int>((c_hi - c_lo + kTile - 1) / kTile) : 0;

  const unsigned char* kbase = p.k + b * p.k_stride[0] + hk * p.k_stride[1];
  const unsigned char* vbase = p.v + b * p.v_stride[0] + hk * p.v_stride[1];
  const float* ksbase = nullptr;
  const float* vsbase = nullptr;
  if (p.kscale != nullptr) {
    ksbase = p.kscale + b * p.ks_stride[0] + hk * p.ks_stride[1];
    vsbase = p.vscale + b * p.vs_stride[0] + hk * p.vs_stride[1];
  }

  int gq[kQuads];  // group of each of the lane's value quads (fast path, quantized)
#pragma unroll
  for (int i = 0; i < kQuads; ++i) gq[i] = kQuant ? ((lane + 32 * i) * 4) / p.group_size : 0;

  float m[kOwn], l[kOwn];
#pragma unroll
  for (int k = 0; k < kOwn; ++k) {
    m[k] = neg_inf();
    l[k] = 0.0f;
  }
  float acc[RB][kQuads][4];
#pragma unroll
  for (int r = 0; r < RB; ++r) {
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][i][c] = 0.0f;
    }
  }

  if constexpr (!kFallback) {
    // One K chunk and one output slice: all D columns.
    load_queries<RB>(p, q_s, bh, nb, 0, D);
    if (ntiles > 0) issue_tile<K>(p, smem, 0, kbase, vbase, ksbase, vsbase, c_lo, static_cast<int>(
                                      c_hi - c_lo < kTile ? c_hi - c_lo : kTile));
    for (int it = 0; it < ntiles; ++it) {
      const int64_t t0 = c_lo + int64_t{it} * kTile;
      const int n = static_cast<int>(c_hi - t0 < kTile ? c_hi - t0 : kTile);
      if (p.stages == 1 && it > 0) {
        __syncthreads();  // everyone is done with the buffer (previous value phase)
        issue_tile<K>(p, smem, 0, kbase, vbase, ksbase, vsbase, t0, n);
      }
      cp_async_wait_all();
      __syncthreads();  // the tile (and on the first pass q_s) is visible to all
      const int buf = p.stages == 2 ? (it & 1) : 0;
      if (p.stages == 2 && it + 1 < ntiles) {
        // The other buffer was last read by the value phase of tile it - 1, which
        // every thread finished before the barrier above.
        const int64_t tn = t0 + kTile;
        const int nn = static_cast<int>(c_hi - tn < kTile ? c_hi - tn : kTile);
        issue_tile<K>(p, smem, buf ^ 1, kbase, vbase, ksbase, vsbase, tn, nn);
      }
      const unsigned char* kt = smem + (2 * buf) * p.tile_bytes;
      const unsigned char* vt = kt + p.tile_bytes;
      const float* kst = reinterpret_cast<const float*>(smem + p.off_scales + (2 * buf) * p.scale_tile_bytes);
      const float* vst = reinterpret_cast<const float*>(smem + p.off_scales + (2 * buf + 1) * p.scale_tile_bytes);

      float s[RB];
#pragma unroll
      for (int r = 0; r < RB; ++r) s[r] = 0.0f;
      score_units<K, kQuant, RB>(kt, kst, q_s, p.q_pitch, p.units, p.row_pitch, p.scale_pitch, p.group_size,
                                 lane, warp, s);
#pragma unroll
      for (int r = 0; r < RB; ++r) red_s[(warp * RB + r) * kTile + lane] = s[r];
      __syncthreads();
      softmax_step<RB>(p, red_s, p_s, alpha_s, lane, warp, t0, n, lo, hi, m, l);
      __syncthreads();
      value_step<K, kQuant, RB, kQuads>(vt, vst, p_s, alpha_s, p.row_pitch, p.scale_pitch, gq, nq, n, lane,
                                        warp, acc);
    }
  } else {
    const int nchunks = (D + kFallbackWidth - 1) / kFallbackWidth;
    const int pitch_f = p.row_pitch / 4;
    float* kt = reinterpret_cast<float*>(smem);
    float* vt = reinterpret_cast<float*>(smem + p.tile_bytes);
    if (nchunks == 1) load_queries<RB>(p, q_s, bh, nb, 0, D);
    for (int it = 0; it < ntiles; ++it) {
      const int64_t t0 = c_lo + int64_t{it} * kTile;
      const int n = static_cast<int>(c_hi - t0 < kTile ? c_hi - t0 : kTile);
      float s[RB];
#pragma unroll
      for (int r = 0; r < RB; ++r) s[r] = 0.0f;
      for (int c = 0; c < nchunks; ++c) {
        const int c0 = c * kFallbackWidth;
        const int cw = D - c0 < kFallbackWidth ? D - c0 : kFallbackWidth;
        const int cwp = (cw + 3) & ~3;
        __syncthreads();  // previous readers of q_s and the tiles are done
        if (nchunks > 1) load_queries<RB>(p, q_s, bh, nb, c0, cw);
        fallback_load_any(p.src_kind, kt, pitch_f, kbase, p.k_stride[2], ksbase, p.ks_stride[2], p.group_size,
                          t0, n, c0, cw, cwp);
        if (c == nchunks - 1) {
          fallback_load_any(p.src_kind, vt, pitch_f, vbase, p.v_stride[2], vsbase, p.vs_stride[2],
                            p.group_size, t0, n, col0, vw, nq * 4);
        }
        __syncthreads();
        score_units<Kind::kF32, false, RB>(reinterpret_cast<const unsigned char*>(kt), nullptr, q_s, p.q_pitch,
                                           cwp / 4, p.row_pitch, 0, 1, lane, warp, s);
      }
#pragma unroll
      for (int r = 0; r < RB; ++r) red_s[(warp * RB + r) * kTile + lane] = s[r];
      __syncthreads();
      softmax_step<RB>(p, red_s, p_s, alpha_s, lane, warp, t0, n, lo, hi, m, l);
      __syncthreads();
      value_step<Kind::kF32, false, RB, kQuads>(reinterpret_cast<const unsigned char*>(vt), nullptr, p_s,
                                                alpha_s, p.row_pitch, 0, gq, nq, n, lane, warp, acc);
    }
  }

  // Add the warps' partial sums (the tiles' space is free now; no copy is in flight).
  constexpr int kQW = W / 4;  // quads per row of the reduction buffer
  float4* accred = reinterpret_cast<float4*>(smem);  // [kWarps][RB][kQW]
  __syncthreads();
#pragma unroll
  for (int r = 0; r < RB; ++r) {
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const int qd = lane + 32 * i;
      if (qd < nq) {
        accred[(warp * RB + r) * kQW + qd] = make_float4(acc[r][i][0], acc[r][i][1], acc[r][i][2], acc[r][i][3]);
      }
    }
  }
  __syncthreads();
  const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma unroll
  for (int k = 0; k < kOwn; ++k) {
    const int r = warp + kWarps * k;
    const int rg = nb * RB + r;
    if (rg >= p.rows) continue;
    const float mk = m[k], lk = l[k];
    const bool is_nan = mk != mk;
    const bool none = mk == neg_inf();
    const float inv = 1.0f / lk;
    const int64_t orow = bh * p.rows + rg;
    const int64_t prow = (bh * p.splits + split) * p.rows + rg;
    for (int qd = lane; qd < nq; qd += 32) {
      float4 a = accred[(0 * RB + r) * kQW + qd];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        const float4 x = accred[(w * RB + r) * kQW + qd];
        a.x += x.x;
        a.y += x.y;
        a.z += x.z;
        a.w += x.w;
      }
      const float vals[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int d = col0 + 4 * qd + c;
        if (4 * qd + c < vw) {
          if (p.direct) {
            p.out[orow * D + d] = is_nan ? nan : (none ? 0.0f : vals[c] * inv);
          } else {
            p.acc_part[prow * D + d] = vals[c];
          }
        }
      }
    }
    if (slice == 0 && lane == 0) {
      if (p.direct) {
        p.lse[orow] = is_nan ? nan : (none ? neg_inf() : mk + logf(lk));
      } else {
        p.m_part[prow] = mk;
        p.l_part[prow] = lk;
      }
    }
  }
}

// Splits of one output row (b, hk, r) merged by log-sum-exp: one warp per row.
__global__ void __launch_bounds__(kThreads)
    attention_merge_kernel(const float* __restrict__ acc_part, const float* __restrict__ m_part,
                           const float* __restrict__ l_part, float* __restrict__ out, float* __restrict__ lse,
                           int64_t num_rows, int rows, int splits, int head_dim) {
  __shared__ float weights[kMergeRows][kMaxSplits];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t row = int64_t{blockIdx.x} * kMergeRows + warp;
  if (row >= num_rows) return;  // whole warps; only __syncwarp below
  const int64_t bh = row / rows;
  const int r = static_cast<int>(row % rows);
  const int64_t first = bh * splits * rows + r;  // split s at first + s * rows
  float mx = neg_inf();
  bool any_nan = false;
  for (int s = lane; s < splits; s += 32) {
    const float x = m_part[first + int64_t{s} * rows];
    any_nan = any_nan || x != x;
    mx = x > mx ? x : mx;
  }
  any_nan = __any_sync(kFullMask, any_nan);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
  float* o = out + row * head_dim;
  if (any_nan || mx == neg_inf()) {
    const float fill = any_nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    for (int d = lane; d < head_dim; d += 32) o[d] = fill;
    if (lane == 0) lse[row] = any_nan ? std::numeric_limits<float>::quiet_NaN() : neg_inf();
    return;
  }
  float total = 0.0f;
  for (int s = lane; s < splits; s += 32) {
    const int64_t at = first + int64_t{s} * rows;
    const float w = expf(m_part[at] - mx);
    weights[warp][s] = w;
    if (w != 0.0f) total += w * l_part[at];
  }
  total = warp_sum(total);
  __syncwarp();
  const float inv = 1.0f / total;
  for (int d = lane; d < head_dim; d += 32) {
    float a = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float w = weights[warp][s];
      if (w != 0.0f) a += w * acc_part[(first + int64_t{s} * rows) * head_dim + d];
    }
    o[d] = a * inv;
  }
  if (lane == 0) lse[row] = mx + logf(total);
}

// ---------------------------------------------------------------------------
// host side

int device_attribute(cudaDeviceAttr attr, c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> sms{}, smem{};
  TORCH_INTERNAL_ASSERT(device >= 0 && device < static_cast<int>(sms.size()));
  auto& cache = attr == cudaDevAttrMultiProcessorCount ? sms[device] : smem[device];
  TORCH_INTERNAL_ASSERT(attr == cudaDevAttrMultiProcessorCount || attr == cudaDevAttrMaxSharedMemoryPerBlockOptin);
  int n = cache.load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, attr, device));
    cache.store(n, std::memory_order_relaxed);
  }
  return n;
}

int align16(int64_t n) { return static_cast<int>((n + 15) / 16 * 16); }
int odd_up(int n) { return n % 2 == 1 ? n : n + 1; }

template <Kind K, int W, int RB, bool kFallback>
void launch_split(const AttnParams& p, dim3 grid, int smem_bytes, c10::DeviceIndex device, cudaStream_t stream) {
  auto kernel = &attention_split_kernel<K, W, RB, kFallback>;
  if (smem_bytes > kDefaultSmem) {
    // Per device and instantiation, raised once (it only ever grows).
    static std::array<std::atomic<int>, 64> raised{};
    TORCH_INTERNAL_ASSERT(device >= 0 && device < static_cast<int>(raised.size()));
    if (raised[device].load(std::memory_order_relaxed) < smem_bytes) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
      raised[device].store(smem_bytes, std::memory_order_relaxed);
    }
  }
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int W, int RB>
void launch_kind(Kind kind, bool fallback, const AttnParams& p, dim3 grid, int smem_bytes,
                 c10::DeviceIndex device, cudaStream_t stream) {
  if constexpr (W == kFallbackWidth) {
    if (fallback) {
      launch_split<Kind::kF32, W, RB, true>(p, grid, smem_bytes, device, stream);
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(!fallback);
  switch (kind) {
    case Kind::kF32: launch_split<Kind::kF32, W, RB, false>(p, grid, smem_bytes, device, stream); break;
    case Kind::kF16: launch_split<Kind::kF16, W, RB, false>(p, grid, smem_bytes, device, stream); break;
    case Kind::kBF16: launch_split<Kind::kBF16, W, RB, false>(p, grid, smem_bytes, device, stream); break;
    case Kind::kE4M3: launch_split<Kind::kE4M3, W, RB, false>(p, grid, smem_bytes, device, stream); break;
    case Kind::kE5M2: launch_split<Kind::kE5M2, W, RB, false>(p, grid, smem_bytes, device, stream); break;
    case Kind::kInt8: launch_split<Kind::kInt8, W, RB, false>(p, grid, smem_bytes, device, stream); break;
  }
}

// Rows of K/V start 16-byte aligned for every (b, hk, t).
bool rows_aligned16(const at::Tensor& t) {
  return is_aligned16(t.const_data_ptr()) &&
         strides_aligned16(3, t.sizes().data(), t.strides().data(), static_cast<int64_t>(t.element_size()));
}

// Shared memory for the layout in `p` (fills the offsets); W, RB of the launch.
int layout_bytes(AttnParams& p, int W, int RB, bool quantized) {
  int64_t region = int64_t{p.stages} * 2 * p.tile_bytes;
  p.off_scales = static_cast<int>(region);
  if (quantized) region += int64_t{p.stages} * 2 * p.scale_tile_bytes;
  const int64_t accred = int64_t{kWarps} * RB * W * static_cast<int64_t>(sizeof(float));
  region = std::max(region, accred);
  p.off_q = align16(region);
  p.off_red = p.off_q + align16(int64_t{RB} * p.q_pitch * 4);
  p.off_p = p.off_red + align16(int64_t{kWarps} * RB * kTile * 4);
  p.off_alpha = p.off_p + align16(int64_t{kTile} * RB * 4);
  return p.off_alpha + align16(int64_t{RB} * 4);
}

// Attention over the stored rows only (no tail).
std::tuple<at::Tensor, at::Tensor> attend_stored_cuda(const at::Tensor& query_in, const at::Tensor& key_in,
                                                       const at::Tensor& value_in,
                                                       const c10::optional<at::Tensor>& key_scales,
                                                       const c10::optional<at::Tensor>& value_scales, double scale,
                                                       double softcap, int64_t window,
                                                       c10::optional<int64_t> query_start) {
  const char* op = "decode_attention";
  const AttentionShape s = check_decode_attention(op, query_in, key_in, value_in, key_scales, value_scales, scale,
                                                  softcap, window, query_start, c10::nullopt, c10::nullopt);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const auto f32 = query_in.options().dtype(at::kFloat);
  const float inf = std::numeric_limits<float>::infinity();

  // Rows any query sees; the ranges grow with the query index.
  int64_t u0 = s.kv_len, u1 = 0;
  for (int64_t i = 0; i < s.q_len; ++i) {
    int64_t a, e;
    attention_row_range(s, i, &a, &e);
    if (a < e) {
      u0 = std::min(u0, a);
      u1 = std::max(u1, e);
    }
  }
  if (s.batch == 0 || s.q_heads == 0 || s.q_len == 0 || s.kv_len == 0 || u0 >= u1) {
    return {at::zeros({s.batch, s.q_heads, s.q_len, s.head_dim}, f32),
            at::full({s.batch, s.q_heads, s.q_len}, -inf, f32)};
  }

  const int64_t n_rep = s.q_heads / s.kv_heads;
  const int64_t R = n_rep * s.q_len;
  const int64_t D = s.head_dim;
  TORCH_CHECK_VALUE(R <= std::numeric_limits<int>::max() / 4 && D <= std::numeric_limits<int>::max() / 64, op,
                    ": too many query rows per KV head (", R, ") or too large a head dim (", D, ")");

  const at::Tensor query = query_in.to(at::kFloat).contiguous();
  const at::Tensor key = last_dim_contiguous(key_in);
  const at::Tensor value = last_dim_contiguous(value_in);
  at::Tensor kscale, vscale;
  if (s.quantized) {
    kscale = last_dim_contiguous(*key_scales);
    vscale = last_dim_contiguous(*value_scales);
  }
  const Kind kind = kv_storage(s, key);
  const int64_t elem = key.element_size();
  const c10::DeviceIndex device = query.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const int max_smem = std::max(kDefaultSmem, device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));

  AttnParams p{};
  p.q = query.const_data_ptr<float>();
  p.k = static_cast<const unsigned char*>(key.const_data_ptr());
  p.v = static_cast<const unsigned char*>(value.const_data_ptr());
  for (int d = 0; d < 3; ++d) {
    p.k_stride[d] = key.stride(d) * elem;
    p.v_stride[d] = value.stride(d) * elem;
  }
  if (s.quantized) {
    p.kscale = kscale.const_data_ptr<float>();
    p.vscale = vscale.const_data_ptr<float>();
    for (int d = 0; d < 3; ++d) {
      p.ks_stride[d] = kscale.stride(d);
      p.vs_stride[d] = vscale.stride(d);
    }
  }
  p.kv_len = s.kv_len;
  p.query_start = s.query_start;
  p.window = s.window;
  p.u0 = u0;
  p.u1 = u1;
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.q_len = static_cast<int>(s.q_len);
  p.rows = static_cast<int>(R);
  p.head_dim = static_cast<int>(D);
  p.group_size = s.quantized ? static_cast<int>(s.group_size) : 1;
  p.groups = s.quantized ? static_cast<int>(s.groups) : 0;
  p.scale = s.scale;
  p.softcap = s.softcap;
  p.src_kind = static_cast<int>(kind);

  const int RB = R <= 4 ? 4 : 8;
  p.row_blocks = static_cast<int>((R + RB - 1) / RB);

  // Fast path if the rows are 16-byte units (codes: groups too) and it fits.
  bool fallback = !(D <= kMaxFastDim && (D * elem) % kUnitBytes == 0 && rows_aligned16(key) &&
                    rows_aligned16(value) && (!s.quantized || s.group_size % 16 == 0));
  int W = 0, smem_bytes = 0;
  if (!fallback) {
    W = D <= 128 ? 128 : 256;
    p.units = static_cast<int>(D * elem / kUnitBytes);
    p.row_pitch = odd_up(p.units) * kUnitBytes;
    p.tile_bytes = kTile * p.row_pitch;
    p.scale_pitch = s.quantized ? odd_up(p.groups) : 0;
    p.scale_tile_bytes = align16(int64_t{kTile} * p.scale_pitch * 4);
    p.q_pitch = static_cast<int>(D);
    p.slices = 1;
    p.stages = 2;
    smem_bytes = layout_bytes(p, W, RB, s.quantized);
    if (smem_bytes > kDefaultSmem) {
      p.stages = 1;
      smem_bytes = layout_bytes(p, W, RB, s.quantized);
    }
    fallback = smem_bytes > max_smem;
  }
  if (fallback) {
    W = kFallbackWidth;
    const int cw = static_cast<int>(std::min<int64_t>(D, kFallbackWidth));
    p.units = 0;
    p.row_pitch = odd_up((cw + 3) / 4) * kUnitBytes;
    p.tile_bytes = kTile * p.row_pitch;
    p.scale_pitch = 0;
    p.scale_tile_bytes = 0;
    p.q_pitch = (cw + 3) / 4 * 4;
    p.slices = static_cast<int>((D + kFallbackWidth - 1) / kFallbackWidth);
    p.stages = 1;  // K and V tiles
    smem_bytes = layout_bytes(p, W, RB, false);
    TORCH_INTERNAL_ASSERT(smem_bytes <= kDefaultSmem, op, ": fallback layout needs ", smem_bytes, " bytes");
  }

  // Splits: about kCtasPerSm CTAs per SM, each split at least kMinSplitRows rows.
  const int64_t work = s.batch * s.kv_heads * p.row_blocks * p.slices;
  TORCH_CHECK_VALUE(work <= std::numeric_limits<int32_t>::max(), op, ": too many (batch, head) rows");
  const int64_t len = u1 - u0;
  const int64_t target = int64_t{kCtasPerSm} * device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (target + work - 1) / work;
  const int64_t most = std::max<int64_t>(1, len / kMinSplitRows);
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, most, int64_t{kMaxSplits}}));
  p.split_len = ((len + splits - 1) / splits + kTile - 1) / kTile * kTile;
  splits = (len + p.split_len - 1) / p.split_len;
  p.splits = static_cast<int>(splits);
  p.direct = splits == 1 ? 1 : 0;

  at::Tensor out = at::empty({s.batch, s.q_heads, s.q_len, s.head_dim}, f32);
  at::Tensor lse = at::empty({s.batch, s.q_heads, s.q_len}, f32);
  at::Tensor acc_part, m_part, l_part;
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  if (!p.direct) {
    acc_part = at::empty({s.batch * s.kv_heads, splits, R, D}, f32);
    m_part = at::empty({s.batch * s.kv_heads, splits, R}, f32);
    l_part = at::empty({s.batch * s.kv_heads, splits, R}, f32);
    p.acc_part = acc_part.data_ptr<float>();
    p.m_part = m_part.data_ptr<float>();
    p.l_part = l_part.data_ptr<float>();
  }

  const dim3 grid(static_cast<unsigned>(work), static_cast<unsigned>(splits));
  if (W == 128 && RB == 4) {
    launch_kind<128, 4>(kind, fallback, p, grid, smem_bytes, device, stream);
  } else if (W == 128) {
    launch_kind<128, 8>(kind, fallback, p, grid, smem_bytes, device, stream);
  } else if (RB == 4) {
    launch_kind<256, 4>(kind, fallback, p, grid, smem_bytes, device, stream);
  } else {
    launch_kind<256, 8>(kind, fallback, p, grid, smem_bytes, device, stream);
  }

  if (!p.direct) {
    const int64_t rows = s.batch * s.kv_heads * R;
    const int64_t blocks = (rows + kMergeRows - 1) / kMergeRows;
    TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many query rows");
    attention_merge_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.acc_part, p.m_part, p.l_part, p.out, p.lse, rows, p.rows, p.splits, p.head_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse};
}

// The kernel reads one row source; a tail (exact newest rows, a few) is attended as a second
// segment and merged by log-sum-exp.
std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(const at::Tensor& query_in, const at::Tensor& key_in,
                                                          const at::Tensor& value_in,
                                                          const c10::optional<at::Tensor>& key_scales,
                                                          const c10::optional<at::Tensor>& value_scales,
                                                          double scale, double softcap, int64_t window,
                                                          c10::optional<int64_t> query_start,
                                                          const c10::optional<at::Tensor>& tail_key,
                                                          const c10::optional<at::Tensor>& tail_value) {
  if (!tail_key.has_value() && !tail_value.has_value()) {  // validated once, inside
    return attend_stored_cuda(query_in, key_in, value_in, key_scales, value_scales, scale, softcap, window,
                              query_start);
  }
  // The tail's checks, and query_start's default counted over stored + tail rows.
  const AttentionShape s = check_decode_attention("decode_attention", query_in, key_in, value_in, key_scales,
                                                  value_scales, scale, softcap, window, query_start, tail_key,
                                                  tail_value);
  const auto stored = attend_stored_cuda(query_in, key_in, value_in, key_scales, value_scales, scale, softcap,
                                         window, s.query_start);
  const auto tail = attend_stored_cuda(query_in, *tail_key, *tail_value, c10::nullopt, c10::nullopt, scale,
                                       softcap, window, s.query_start - s.stored_len);
  return merge_attention_parts(std::get<0>(stored), std::get<1>(stored), std::get<0>(tail), std::get<1>(tail));
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace kvcompact

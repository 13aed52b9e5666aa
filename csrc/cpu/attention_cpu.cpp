// CPU decode attention over cache storage (model-dtype or 8-bit codes).
//
// Strategy. Work is split into tasks (batch, KV head, KV split): a task owns
// the n_rep * Q query rows that read one KV head (GQA), so each key and value
// row is decoded from storage once and used by all of them. A task walks its
// split in blocks of kBlock rows: decode the block's key rows to fp32 (scale
// folded in; an L1-sized, 64-byte-aligned scratch), dot them with every query
// row 16 keys at a time (the query row held in registers for head dims 64 and
// 128; the 16 sums reduced together, not one by one), softcap and mask the
// scores, update each row's running max and sum (online softmax, exp on 16
// lanes), then decode the block's value rows and add them, weighted, to each
// row's fp32 accumulator (also held in registers across the block). Splits
// give both cores work when B * Hkv is small (one decode step of one sequence)
// and are merged at the end by log-sum-exp, the same rule that merges
// separately attended segments.
//
// Rows come from two sources: the stored rows (codes or model dtype), then an
// optional tail of exact newest rows (fp32), read by the same online softmax,
// so a decode step of an 8-bit cache is one call with no merge.
//
// Nothing proportional to T is allocated: per task a few rows of scratch, and
// per call the [B, Hkv, splits, rows, D] partial sums.
//
// The lane loops (cpu/lanes.h) are compiled three times, for AVX-512, AVX2 and
// generic x86-64 (cpu/isa.h), and the best the CPU has runs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kvcompact/attention_args.h"
#include "kvcompact/cpu/isa.h"
#include "kvcompact/cpu/lanes.h"
#include "kvcompact/quant_math.h"

// The build passes -ffp-contract=off so that quantize/dequantize match reference.py bit for bit.
// Attention is specified to float32 rounding, not bits: let a * b + c become one FMA here (one
// rounding instead of two, and half the instructions in the dot products and the value sums).
#pragma GCC optimize("fp-contract=fast")

namespace kvcompact {
namespace {

constexpr int64_t kBlock = 32;          // KV rows per online-softmax step
constexpr int64_t kMinSplitRows = 256;  // a split shorter than this costs more to merge than it saves

using RowKind = KVStorage;  // how K/V rows are stored (attention_args.h)

struct Job {
  AttentionShape s;
  int64_t n_rep;   // query heads per KV head
  int64_t rows;    // query rows per task: n_rep * Q
  int64_t splits;  // KV splits per (batch, KV head)
  int64_t split_len;
  RowKind kind;
  const float* q;  // [B, Hq, Q, D] fp32, contiguous
  const char* k;
  const char* v;
  int64_t elem;  // bytes per K/V element
  int64_t ks[3], vs[3];  // element strides of key / value over (B, Hkv, T); last dim contiguous
  const float* kscale;
  const float* vscale;
  int64_t kss[3], vss[3];  // strides of the scales over (B, Hkv, T); their last dim contiguous
  int64_t stored_len;      // rows of k/v; rows [stored_len, s.kv_len) are the tail's
  const float* tail_k;     // [B, Hkv, kv_len - stored_len, D] fp32, contiguous (or null)
  const float* tail_v;
  // Outputs of the tasks: acc [task, rows, D] (unnormalized), max and sum [task, rows].
  float* acc;
  float* row_max;
  float* row_sum;
};

// One K or V row (D elements) to fp32, times its group scales when quantized. `V`: D (and the
// group size) are multiples of 16, so whole 16-float vectors are decoded, chunk c with the scale of
// group `chunk_group[c]` (a table, so that the loop has a constant trip count when D is one).
template <RowKind K, bool V>
KVC_INLINE void load_row(const char* base, const float* scales, int64_t D, int64_t G, const int32_t* chunk_group,
                         float* __restrict out) {
  if constexpr (V && (K == RowKind::kF32 || K == RowKind::kF16 || K == RowKind::kBF16)) {
    for (int64_t i = 0; i < D; i += 16) {
      cpu::vf16 x;
      if constexpr (K == RowKind::kF32) {
        x = cpu::load16(reinterpret_cast<const float*>(base) + i);
      } else if constexpr (K == RowKind::kF16) {
        x = cpu::decode16_f16(reinterpret_cast<const uint16_t*>(base) + i);
      } else {
        x = cpu::decode16_bf16(reinterpret_cast<const uint16_t*>(base) + i);
      }
      cpu::store16(out + i, x);
    }
  } else if constexpr (V) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(base);
    for (int64_t c = 0; c < D / 16; ++c) {
      // An empty asm hides that the chunks are adjacent: with the chunk loop unrolled, GCC 12's
      // straight-line vectorizer otherwise loads the row's codes as one vector and rebuilds each
      // chunk byte by byte (16 vpinsrb) instead of one widening load -- twice the decode's cost.
      const uint8_t* pc = p + 16 * c;
      asm("" : "+r"(pc));
      cpu::vf16 x;
      if constexpr (K == RowKind::kE4M3) {
        x = cpu::decode16_e4m3(pc);
      } else if constexpr (K == RowKind::kE5M2) {
        x = cpu::decode16_e5m2(pc);
      } else {
        x = cpu::decode16_int8(pc);
      }
      cpu::store16(out + 16 * c, x * scales[chunk_group[c]]);
    }
  } else if constexpr (K == RowKind::kF32) {
    const float* p = reinterpret_cast<const float*>(base);
    for (int64_t i = 0; i < D; ++i) out[i] = p[i];
  } else if constexpr (K == RowKind::kF16 || K == RowKind::kBF16) {
    using elem_t = std::conditional_t<K == RowKind::kF16, c10::Half, c10::BFloat16>;
    const elem_t* p = reinterpret_cast<const elem_t*>(base);
    for (int64_t i = 0; i < D; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    // The scalar decode of quant_math.h (the contract's), for layouts the vector path does not take.
    constexpr QuantFormat kFormat = K == RowKind::kE4M3   ? QuantFormat::kFp8E4M3
                                    : K == RowKind::kE5M2 ? QuantFormat::kFp8E5M2
                                                          : QuantFormat::kInt8;
    const uint8_t* p = reinterpret_cast<const uint8_t*>(base);
    for (int64_t g = 0; g < D / G; ++g) {
      const float sc = scales[g];
      const uint8_t* pg = p + g * G;
      float* og = out + g * G;
      for (int64_t i = 0; i < G; ++i) {
        og[i] = decode<kFormat>(static_cast<typename FormatTraits<kFormat>::code_t>(pg[i])) * sc;
      }
    }
  }
}

template <bool V>
KVC_INLINE void axpy_row(float p, const float* __restrict x, float* __restrict y, int64_t D) {
  if constexpr (V) {
    const cpu::vf16 pv = cpu::splat16(p);
    for (int64_t i = 0; i < D; i += 16) cpu::store16(y + i, cpu::load16(y + i) + pv * cpu::load16(x + i));
  } else {
    cpu::axpy(p, x, y, D);
  }
}

KVC_INLINE float softcapped(float x, float softcap) {
  return softcap > 0.0f ? softcap * std::tanh(x / softcap) : x;
}

// Scores of query row `q` against the block's decoded keys `kblk` [n, D]: dot * scale, softcapped,
// -inf outside the row's visible rows [lo, hi).
//
// Vector path (V): 16 keys at a time -- 16 dot products reduced together (cpu::hsum16x16), masked
// with one compare, stored as one vector. `out` and `kblk` have room for n rounded up to 16; the
// lanes past n are masked (callers pass hi <= first + n). DV > 0: D == DV, the query row lives in
// registers.
template <bool V, int DV>
KVC_INLINE void block_scores(const float* __restrict q, const float* __restrict kblk, int64_t n, int64_t D,
                             int64_t first, int64_t lo, int64_t hi, const AttentionShape& s, float* __restrict out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if constexpr (V) {
    constexpr int kChunks = DV > 0 ? DV / 16 : 1;
    cpu::vf16 qv[kChunks];
    if constexpr (DV > 0) {
      for (int i = 0; i < kChunks; ++i) qv[i] = cpu::load16(q + 16 * i);
    }
    const cpu::vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      cpu::vf16 dots[16];
      for (int j = 0; j < 16; ++j) {
        const float* k = kblk + (j0 + j) * D;
        if constexpr (DV > 0) {
          cpu::vf16 a = qv[0] * cpu::load16(k);
          for (int i = 1; i < kChunks; ++i) a += qv[i] * cpu::load16(k + 16 * i);
          dots[j] = a;
        } else {
          cpu::vf16 a = cpu::load16(q) * cpu::load16(k);
          for (int64_t i = 16; i < D; i += 16) a += cpu::load16(q + i) * cpu::load16(k + i);
          dots[j] = a;
        }
      }
      cpu::vf16 x = cpu::hsum16x16(dots) * s.scale;
      if (s.softcap > 0.0f) {
        for (int l = 0; l < 16; ++l) x[l] = softcapped(x[l], s.softcap);
      }
      // Visible lanes: [lo - t0, hi - t0) clamped to [0, 16), t0 the chunk's first row.
      const int64_t t0 = first + j0;
      const int32_t vis_lo = static_cast<int32_t>(std::clamp<int64_t>(lo - t0, 0, 16));
      const int32_t vis_hi = static_cast<int32_t>(std::clamp<int64_t>(hi - t0, 0, 16));
      x = (lane >= vis_lo) & (lane < vis_hi) ? x : cpu::splat16(neg_inf);
      cpu::store16(out + j0, x);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = first + j;
      out[j] = (t >= lo && t < hi) ? softcapped(cpu::dot(q, kblk + j * D, D) * s.scale, s.softcap) : neg_inf;
    }
  }
}

// Online softmax of one row over a block: turns the row's scores `sr` [n] into weights
// exp(score - new max), rescales what the row accumulated when its running max grows, and updates
// the running max and sum. A row that sees nothing in the block gets zero weights.
template <bool V>
KVC_INLINE void block_softmax(float* __restrict sr, int64_t n, float* __restrict acc, int64_t D, float* row_max,
                              float* row_sum) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float bmax = neg_inf;
  if constexpr (V) {  // `sr` holds n rounded up to 16, masked lanes -inf
    cpu::vf16 m = cpu::load16(sr);
    for (int64_t j = 16; j < n; j += 16) m = cpu::max16_nan(m, cpu::load16(sr + j));
    bmax = cpu::hmax16_nan(m);
  } else {
    for (int64_t j = 0; j < n; ++j) bmax = (sr[j] > bmax || sr[j] != sr[j]) ? sr[j] : bmax;
  }
  if (bmax == neg_inf) {  // nothing visible in this block for this row
    std::fill(sr, sr + n, 0.0f);
    return;
  }
  const float old_max = *row_max;
  const float new_max = (bmax > old_max || bmax != bmax) ? bmax : old_max;
  const float alpha = cpu::exp_nonpositive(old_max - new_max);  // 0 while old_max is -inf
  float sum = 0.0f;
  if constexpr (V) {
    const cpu::vf16 mv = cpu::splat16(new_max);
    cpu::vf16 total = {};
    for (int64_t j = 0; j < n; j += 16) {
      const cpu::vf16 p = cpu::exp16_nonpositive(cpu::load16(sr + j) - mv);
      cpu::store16(sr + j, p);
      total += p;
    }
    sum = cpu::hsum16(total);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      sr[j] = cpu::exp_nonpositive(sr[j] - new_max);
      sum += sr[j];
    }
  }
  if (alpha != 1.0f) cpu::scale_inplace(alpha, acc, D);
  *row_sum = *row_sum * alpha + sum;
  *row_max = new_max;
}

// acc [D] += sum_{j in [j0, j1)} p[j] * vblk[j], over the keys of the block the row sees (a masked
// key never touches the sum, even when its value is not finite). DV > 0: D == DV, the accumulator
// lives in registers for the whole block.
template <bool V, int DV>
KVC_INLINE void block_values(const float* __restrict p, const float* __restrict vblk, int64_t j0, int64_t j1,
                             int64_t D, float* __restrict acc) {
  if constexpr (DV > 0) {
    cpu::vf16 a[DV / 16];
    for (int i = 0; i < DV / 16; ++i) a[i] = cpu::load16(acc + 16 * i);
    for (int64_t j = j0; j < j1; ++j) {
      const cpu::vf16 pj = cpu::splat16(p[j]);
      const float* v = vblk + j * DV;
      for (int i = 0; i < DV / 16; ++i) a[i] += pj * cpu::load16(v + 16 * i);
    }
    for (int i = 0; i < DV / 16; ++i) cpu::store16(acc + 16 * i, a[i]);
  } else {
    for (int64_t j = j0; j < j1; ++j) axpy_row<V>(p[j], vblk + j * D, acc, D);
  }
}

// Where one task reads rows: a K/V source (the stored rows, or the tail of exact newest rows) for
// one (batch, KV head), its rows numbered from `first` in the attended sequence.
struct RowSource {
  const char* k;
  const char* v;
  int64_t k_row, v_row;  // bytes between consecutive rows
  const float* ks;       // scales (quantized sources only)
  const float* vs;
  int64_t ks_row, vs_row;  // floats between consecutive rows' scales
  int64_t first;
};

// Per-task state: the query rows, their visible ranges, the online-softmax accumulators, and
// 64-byte-aligned scratch (a 16-float vector that straddles two cache lines costs a second access).
struct TaskState {
  const float* q;  // [R, D]
  const int64_t* lo;
  const int64_t* hi;
  float* acc;  // [R, D]
  float* row_max;
  float* row_sum;
  float* kblk;    // [kBlock, D]
  float* vblk;    // [kBlock, D]
  float* scores;  // [R, kBlock]
  const int32_t* chunk_group;
};

// Rows [from, to) of `src` for every query row of the task, in blocks of kBlock: a block's key
// rows and value rows are each decoded once into scratch and then used by every query row.
template <RowKind K, bool V, int DV>
KVC_INLINE void attend_rows(const Job& job, const RowSource& src, int64_t from, int64_t to, const TaskState& st) {
  const AttentionShape& s = job.s;
  const int64_t R = job.rows;
  const int64_t D = DV > 0 ? DV : s.head_dim;  // a constant when DV > 0, so loops over it unroll
  const int64_t G = s.quantized ? s.group_size : D;
  for (int64_t blk = from; blk < to; blk += kBlock) {
    const int64_t n = std::min(kBlock, to - blk);
    const int64_t row0 = blk - src.first;
    for (int64_t j = 0; j < n; ++j) {
      load_row<K, V>(src.k + (row0 + j) * src.k_row, src.ks ? src.ks + (row0 + j) * src.ks_row : nullptr, D, G,
                     st.chunk_group, st.kblk + j * D);
    }
    for (int64_t r = 0; r < R; ++r) {
      // A row's range may run past this source's rows (into the tail): clip it to the block.
      block_scores<V, DV>(st.q + r * D, st.kblk, n, D, blk, st.lo[r], std::min(st.hi[r], blk + n), s,
                          st.scores + r * kBlock);
      block_softmax<V>(st.scores + r * kBlock, n, st.acc + r * D, D, st.row_max + r, st.row_sum + r);
    }
    for (int64_t j = 0; j < n; ++j) {
      load_row<K, V>(src.v + (row0 + j) * src.v_row, src.vs ? src.vs + (row0 + j) * src.vs_row : nullptr, D, G,
                     st.chunk_group, st.vblk + j * D);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t j0 = std::clamp<int64_t>(st.lo[r] - blk, 0, n), j1 = std::clamp<int64_t>(st.hi[r] - blk, 0, n);
      block_values<V, DV>(st.scores + r * kBlock, st.vblk, j0, j1, D, st.acc + r * D);
    }
  }
}

// One task: the query rows of (b, hk) against rows [t0, t1) of the split -- the stored rows, then
// the tail's (exact newest rows, fp32) where the split reaches them.
template <RowKind K, bool V, int DV>
KVC_INLINE void run_task(const Job& job, int64_t task, float* scratch, const int32_t* chunk_group) {
  const AttentionShape& s = job.s;
  const int64_t D = s.head_dim, Q = s.q_len, R = job.rows;
  const int64_t split = task % job.splits;
  const int64_t bh = task / job.splits;
  const int64_t b = bh / s.kv_heads, hk = bh % s.kv_heads;

  TaskState st;
  st.acc = job.acc + task * R * D;
  st.row_max = job.row_max + task * R;
  st.row_sum = job.row_sum + task * R;
  st.kblk = scratch;
  st.vblk = st.kblk + kBlock * D;
  st.scores = st.vblk + kBlock * D;
  int64_t* lo = reinterpret_cast<int64_t*>(st.scores + R * kBlock);
  int64_t* hi = lo + R;
  st.lo = lo;
  st.hi = hi;
  st.chunk_group = chunk_group;
  // Query row r = (head hk * n_rep + r / Q, query r % Q); rows of one task are contiguous in q.
  st.q = job.q + ((b * s.q_heads + hk * job.n_rep) * Q) * D;

  const int64_t t0 = split * job.split_len;
  const int64_t t1 = std::min(s.kv_len, t0 + job.split_len);
  int64_t u0 = t1, u1 = t0;  // union of the rows' visible ranges within the split
  for (int64_t r = 0; r < R; ++r) {
    int64_t a, e;
    attention_row_range(s, r % Q, &a, &e);
    lo[r] = std::max(a, t0);
    hi[r] = std::min(e, t1);
    if (lo[r] < hi[r]) {
      u0 = std::min(u0, lo[r]);
      u1 = std::max(u1, hi[r]);
    }
    st.row_max[r] = -std::numeric_limits<float>::infinity();
    st.row_sum[r] = 0.0f;
  }
  std::fill(st.acc, st.acc + R * D, 0.0f);

  const int64_t T = job.stored_len;
  if (u0 < std::min(u1, T)) {
    RowSource src{};
    src.k = job.k + (b * job.ks[0] + hk * job.ks[1]) * job.elem;
    src.v = job.v + (b * job.vs[0] + hk * job.vs[1]) * job.elem;
    src.k_row = job.ks[2] * job.elem;
    src.v_row = job.vs[2] * job.elem;
    if (s.quantized) {
      src.ks = job.kscale + b * job.kss[0] + hk * job.kss[1];
      src.vs = job.vscale + b * job.vss[0] + hk * job.vss[1];
      src.ks_row = job.kss[2];
      src.vs_row = job.vss[2];
    }
    attend_rows<K, V, DV>(job, src, u0, std::min(u1, T), st);
  }
  if (std::max(u0, T) < u1) {
    // The tail: fp32 [B, Hkv, T_tail, D], contiguous.
    const int64_t tail_len = s.kv_len - T;
    RowSource src{};
    src.k = reinterpret_cast<const char*>(job.tail_k + (b * s.kv_heads + hk) * tail_len * D);
    src.v = reinterpret_cast<const char*>(job.tail_v + (b * s.kv_heads + hk) * tail_len * D);
    src.k_row = src.v_row = D * static_cast<int64_t>(sizeof(float));
    src.first = T;
    attend_rows<RowKind::kF32, V, DV>(job, src, std::max(u0, T), u1, st);
  }
}

// 64-byte-aligned float scratch for one thread's tasks.
class Scratch {
 public:
  explicit Scratch(int64_t floats) : buf_(static_cast<size_t>(floats + 16)) {}
  float* data() {
    const auto addr = reinterpret_cast<uintptr_t>(buf_.data());
    return reinterpret_cast<float*>((addr + 63) & ~uintptr_t(63));
  }

 private:
  std::vector<float> buf_;  // zeroed: lanes past a block's last key are read (and masked)
};

// One compiled function per (ISA, storage kind, head-dim variant). Each is small: inlined together
// into one function per ISA, the variants' hot loops lost their registers to spills.
using TaskFn = void (*)(const Job&, int64_t task, float* scratch, const int32_t* chunk_group);

struct GenericIsa {
  template <RowKind K, bool V, int DV>
  static void task(const Job& job, int64_t task, float* scratch, const int32_t* chunk_group) {
    run_task<K, V, DV>(job, task, scratch, chunk_group);
  }
};
#if KVC_HAS_X86_ISAS
struct Avx2Isa {
  template <RowKind K, bool V, int DV>
  KVC_TARGET_AVX2 static void task(const Job& job, int64_t task, float* scratch, const int32_t* chunk_group) {
    run_task<K, V, DV>(job, task, scratch, chunk_group);
  }
};
struct Avx512Isa {
  template <RowKind K, bool V, int DV>
  KVC_TARGET_AVX512 static void task(const Job& job, int64_t task, float* scratch, const int32_t* chunk_group) {
    run_task<K, V, DV>(job, task, scratch, chunk_group);
  }
};
#endif

template <class Isa, RowKind K>
void run_tasks(const Job& job, int64_t begin, int64_t end) {
  const int64_t R = job.rows, D = job.s.head_dim;
  // kblk, vblk, scores, lo, hi (the int64 arrays take two floats per entry).
  Scratch scratch(2 * kBlock * D + R * kBlock + 4 * R);
  const bool vec = D % 16 == 0 && (!job.s.quantized || job.s.group_size % 16 == 0);
  // Group of each 16-float chunk of a row (vector path of quantized rows).
  std::vector<int32_t> chunk_group(static_cast<size_t>(D / 16 + 1));
  if (vec && job.s.quantized) {
    for (int64_t c = 0; c < D / 16; ++c) chunk_group[c] = static_cast<int32_t>(16 * c / job.s.group_size);
  }
  const TaskFn fn = !vec         ? &Isa::template task<K, false, 0>
                    : D == 64    ? &Isa::template task<K, true, 64>
                    : D == 128   ? &Isa::template task<K, true, 128>
                                 : &Isa::template task<K, true, 0>;
  for (int64_t task = begin; task < end; ++task) fn(job, task, scratch.data(), chunk_group.data());
}

template <class Isa>
void run_isa(const Job& job, int64_t begin, int64_t end) {
  switch (job.kind) {
    case RowKind::kF32: run_tasks<Isa, RowKind::kF32>(job, begin, end); break;
    case RowKind::kF16: run_tasks<Isa, RowKind::kF16>(job, begin, end); break;
    case RowKind::kBF16: run_tasks<Isa, RowKind::kBF16>(job, begin, end); break;
    case RowKind::kE4M3: run_tasks<Isa, RowKind::kE4M3>(job, begin, end); break;
    case RowKind::kE5M2: run_tasks<Isa, RowKind::kE5M2>(job, begin, end); break;
    case RowKind::kInt8: run_tasks<Isa, RowKind::kInt8>(job, begin, end); break;
  }
}

using RunFn = void (*)(const Job&, int64_t, int64_t);

RunFn pick_kernel() {
#if KVC_HAS_X86_ISAS
  switch (cpu::cpu_isa()) {
    case cpu::Isa::kAvx512: return &run_isa<Avx512Isa>;
    case cpu::Isa::kAvx2: return &run_isa<Avx2Isa>;
    case cpu::Isa::kGeneric: break;
  }
#endif
  return &run_isa<GenericIsa>;
}

int64_t choose_splits(const AttentionShape& s) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t heads = std::max<int64_t>(1, s.batch * s.kv_heads);
  const int64_t most = std::max<int64_t>(1, s.kv_len / kMinSplitRows);
  int64_t splits = std::min((4 * threads + heads - 1) / heads, most);  // a few tasks per thread
  // Equal shares: 3 KV heads x 3 splits on 2 threads leave one thread a fifth task to run alone.
  while (splits < most && (heads * splits) % threads != 0) ++splits;
  return std::max<int64_t>(1, splits);
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(const at::Tensor& query_in, const at::Tensor& key_in,
                                                         const at::Tensor& value_in,
                                                         const c10::optional<at::Tensor>& key_scales,
                                                         const c10::optional<at::Tensor>& value_scales,
                                                         double scale, double softcap, int64_t window,
                                                         c10::optional<int64_t> query_start,
                                                         const c10::optional<at::Tensor>& tail_key,
                                                         const c10::optional<at::Tensor>& tail_value) {
  const char* op = "decode_attention";
  const AttentionShape s =
      check_decode_attention(op, query_in, key_in, value_in, key_scales, value_scales, scale, softcap, window,
                             query_start, tail_key, tail_value);
  const auto f32 = query_in.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({s.batch, s.q_heads, s.q_len, s.head_dim}, f32);
  at::Tensor lse = at::full({s.batch, s.q_heads, s.q_len}, -std::numeric_limits<float>::infinity(), f32);
  if (s.batch == 0 || s.q_heads == 0 || s.q_len == 0 || s.kv_len == 0) return {out, lse};

  const at::Tensor query = query_in.to(at::kFloat).contiguous();
  const at::Tensor key = last_dim_contiguous(key_in);
  const at::Tensor value = last_dim_contiguous(value_in);
  // The tail is a few rows (the newest, exact): read as fp32 whatever its dtype.
  at::Tensor tail_k, tail_v;
  if (s.kv_len > s.stored_len) {
    tail_k = tail_key->to(at::kFloat).contiguous();
    tail_v = tail_value->to(at::kFloat).contiguous();
  }
  at::Tensor kscale, vscale;
  if (s.quantized) {
    kscale = last_dim_contiguous(*key_scales);
    vscale = last_dim_contiguous(*value_scales);
  }

  Job job{};
  job.s = s;
  job.n_rep = s.q_heads / s.kv_heads;
  job.rows = job.n_rep * s.q_len;
  job.splits = choose_splits(s);
  job.split_len = (s.kv_len + job.splits - 1) / job.splits;
  job.splits = (s.kv_len + job.split_len - 1) / job.split_len;
  job.kind = kv_storage(s, key);
  job.q = query.const_data_ptr<float>();
  job.k = static_cast<const char*>(key.const_data_ptr());
  job.v = static_cast<const char*>(value.const_data_ptr());
  job.elem = key.element_size();
  job.stored_len = s.stored_len;
  if (tail_k.defined()) {
    job.tail_k = tail_k.const_data_ptr<float>();
    job.tail_v = tail_v.const_data_ptr<float>();
  }
  for (int d = 0; d < 3; ++d) {
    job.ks[d] = key.stride(d);
    job.vs[d] = value.stride(d);
  }
  if (s.quantized) {
    job.kscale = kscale.const_data_ptr<float>();
    job.vscale = vscale.const_data_ptr<float>();
    for (int d = 0; d < 3; ++d) {
      job.kss[d] = kscale.stride(d);
      job.vss[d] = vscale.stride(d);
    }
  }
  const int64_t tasks = s.batch * s.kv_heads * job.splits;
  at::Tensor acc = at::empty({tasks, job.rows, s.head_dim}, f32);
  at::Tensor row_max = at::empty({tasks, job.rows}, f32);
  at::Tensor row_sum = at::empty({tasks, job.rows}, f32);
  job.acc = acc.data_ptr<float>();
  job.row_max = row_max.data_ptr<float>();
  job.row_sum = row_sum.data_ptr<float>();

  const RunFn run = pick_kernel();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { run(job, begin, end); });

  // Merge the splits of each query row: the log-sum-exp rule.
  float* out_ptr = out.data_ptr<float>();
  float* lse_ptr = lse.data_ptr<float>();
  const int64_t D = s.head_dim, R = job.rows, S = job.splits;
  at::parallel_for(0, s.batch * s.kv_heads * R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / R, r = idx % R;
      float m = -std::numeric_limits<float>::infinity();
      bool nan = false;
      for (int64_t sp = 0; sp < S; ++sp) {
        const float x = job.row_max[(bh * S + sp) * R + r];
        nan = nan || x != x;
        m = x > m ? x : m;
      }
      // Output row: query head hk * n_rep + r / Q, query r % Q, i.e. row (bh * R + r) of out.
      float* o = out_ptr + (bh * R + r) * D;
      if (nan) {
        std::fill(o, o + D, std::numeric_limits<float>::quiet_NaN());
        lse_ptr[bh * R + r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (m == -std::numeric_limits<float>::infinity()) continue;  // sees nothing: 0 and -inf
      float total = 0.0f;
      for (int64_t sp = 0; sp < S; ++sp) {
        const int64_t t = bh * S + sp;
        const float w = std::exp(job.row_max[t * R + r] - m);
        if (w == 0.0f) continue;
        total += w * job.row_sum[t * R + r];
        const float* a = job.acc + (t * R + r) * D;
        for (int64_t i = 0; i < D; ++i) o[i] += w * a[i];
      }
      const float inv = 1.0f / total;
      for (int64_t i = 0; i < D; ++i) o[i] *= inv;
      lse_ptr[bh * R + r] = m + std::log(total);
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace kvcompact

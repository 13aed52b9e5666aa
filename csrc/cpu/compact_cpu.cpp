// CPU compact_ and move_: in-place token moves along dim 2.
//
// Strategy: work items are (row (b, h), tensor) pairs split across threads with
// at::parallel_for; rows never read each other's memory, so items are
// independent. Values are opaque bytes (token_layout.h), so one loop serves
// every dtype of a cache group.
//
// Ordering (compact_): within a row, destination j reads source keep_idx[j] >= j
// (strictly increasing indices in [0, T) give keep_idx[j] >= j). Walking j
// upward, the write to slot j can only clobber a source keep_idx[j'] = j with
// j' < j, already read; sources of later j'' are keep_idx[j''] > keep_idx[j] >= j.
// So a forward walk is a safe in-place gather with no temporary. Runs of
// consecutive kept tokens (sinks, the recent window) become one memmove when a
// row's tokens are contiguous; the untouched prefix (keep_idx[j] == j) is skipped.
// move_ is memmove per row (or a per-token walk in the safe direction).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "kvcompact/token_args.h"
#include "kvcompact/token_layout.h"

namespace kvcompact {
namespace {

// Copies one token block (non-overlapping source and destination).
inline void copy_token(const TokenLayout& L, char* dst, const char* src) {
  if (L.chunks == 1) {
    std::memcpy(dst, src, L.chunk_bytes);
    return;
  }
  for (int64_t c = 0; c < L.chunks; ++c) {
    const int64_t off = L.chunk_offset(c);
    switch (L.chunk_bytes) {  // fixed sizes let the compiler emit a single move
      case 1: std::memcpy(dst + off, src + off, 1); break;
      case 2: std::memcpy(dst + off, src + off, 2); break;
      case 4: std::memcpy(dst + off, src + off, 4); break;
      case 8: std::memcpy(dst + off, src + off, 8); break;
      default: std::memcpy(dst + off, src + off, L.chunk_bytes); break;
    }
  }
}

void compact_row(const TokenLayout& L, char* row, const int64_t* keep, int64_t sk, int64_t K,
                 int64_t T) {
  const int64_t st = L.stride_t;
  int64_t j = 0;
  while (j < K && keep[j * sk] == j) ++j;  // untouched prefix
  if (L.tokens_contiguous()) {
    const int64_t tb = L.chunk_bytes;
    while (j < K) {
      const int64_t s = keep[j * sk];
      if (s < 0 || s >= T) {  // only reachable with validate=False: skip, never touch memory
        ++j;
        continue;
      }
      int64_t n = 1;
      while (j + n < K && keep[(j + n) * sk] == s + n && s + n < T) ++n;
      if (s != j) std::memmove(row + j * st, row + s * st, n * tb);
      j += n;
    }
    return;
  }
  for (; j < K; ++j) {
    const int64_t s = keep[j * sk];
    if (s == j || s < 0 || s >= T) continue;
    copy_token(L, row + j * st, row + s * st);
  }
}

void compact_cpu(at::TensorList tensors, const at::Tensor& keep_idx, bool validate) {
  const TokenGroup g = check_token_tensors("compact_", tensors);
  const int64_t K = check_keep_idx_meta("compact_", keep_idx, g);
  if (validate) validate_keep_idx_host("compact_", keep_idx, g.T);
  const int64_t rows = g.B * g.H;
  const int64_t n = static_cast<int64_t>(g.layouts.size());
  if (rows == 0 || K == 0 || n == 0) return;
  const int64_t* keep = keep_idx.const_data_ptr<int64_t>();
  const int64_t kb = keep_idx.stride(0), kh = keep_idx.stride(1), sk = keep_idx.stride(2);
  const int64_t H = g.H, T = g.T;
  at::parallel_for(0, rows * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / n, b = r / H, h = r % H;
      const TokenLayout& L = g.layouts[w % n];
      compact_row(L, L.data + L.token_offset(b, h, 0), keep + b * kb + h * kh, sk, K, T);
    }
  });
}

void move_cpu(at::TensorList tensors, int64_t src_start, int64_t src_end, int64_t dst_start) {
  const TokenGroup g = check_token_tensors("move_", tensors);
  check_move_range("move_", g.T, src_start, src_end, dst_start);
  const int64_t count = src_end - src_start;
  const int64_t rows = g.B * g.H;
  const int64_t n = static_cast<int64_t>(g.layouts.size());
  if (count == 0 || src_start == dst_start || rows == 0 || n == 0) return;
  const int64_t H = g.H;
  at::parallel_for(0, rows * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / n, b = r / H, h = r % H;
      const TokenLayout& L = g.layouts[w % n];
      char* row = L.data + L.token_offset(b, h, 0);
      const int64_t st = L.stride_t;
      if (L.tokens_contiguous()) {
        std::memmove(row + dst_start * st, row + src_start * st, count * L.chunk_bytes);
      } else if (dst_start < src_start) {  // moving down: read ahead of the writes
        for (int64_t i = 0; i < count; ++i) {
          copy_token(L, row + (dst_start + i) * st, row + (src_start + i) * st);
        }
      } else {  // moving up: walk backwards
        for (int64_t i = count - 1; i >= 0; --i) {
          copy_token(L, row + (dst_start + i) * st, row + (src_start + i) * st);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CPU, m) {
  m.impl("compact_", &compact_cpu);
  m.impl("move_", &move_cpu);
}

}  // namespace kvcompact

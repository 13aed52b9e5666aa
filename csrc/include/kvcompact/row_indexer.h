// Flat work-item index -> element offsets in several strided tensors, cheap enough
// to run per work item inside a GPU kernel.
//
// layout.h's RowOffsets divides by every leading size with 64-bit division, which
// costs tens of instructions per dim on a GPU. A RowIndexer is built once on the
// host from an index space (outer -> inner dims, each with one stride per tensor):
// dims of size 1 are dropped and adjacent dims that are contiguous in every
// tensor are merged, so a contiguous tensor needs no division at all and a
// transposed key view ([B, T, H, D] storage seen as [B, H, T, D]) needs one or
// two. The divisions that remain use 32-bit multiply-high "magic numbers"
// (FastDivmod) whenever the whole index space is below 2^31, which is every
// realistic KV cache; larger spaces take the plain 64-bit path (a uniform branch).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "kvcompact/layout.h"

namespace kvcompact {

// Leading dims plus up to two inner dims a kernel adds (groups, chunks in a group).
constexpr int kMaxIndexDims = kMaxLeadingDims + 2;

// n / d and n % d for 0 <= n < 2^31 and 1 <= d < 2^31, with one multiply-high:
// with s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1,
// n / d = (mulhi(n, m) + n) >> s (Granlund & Montgomery; the form ATen uses).
// The sum stays below 2^32 because n < 2^31 and mulhi(n, m) < n.
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  FastDivmod() = default;

  explicit FastDivmod(uint32_t d) : divisor(d) {
    TORCH_INTERNAL_ASSERT(d >= 1 && d < (1u << 31), "FastDivmod: divisor out of range");
    shift = 0;
    while ((uint64_t{1} << shift) < d) ++shift;
    const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1;
    multiplier = static_cast<uint32_t>(m);
  }

  C10_HOST_DEVICE inline uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t{n} * multiplier) >> 32);
#endif
    return (hi + n) >> shift;
  }

  C10_HOST_DEVICE inline void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

// Element offsets of flat item `i` in N tensors. Dims are stored innermost first.
template <int N>
struct RowIndexer {
  int ndim = 0;
  bool use32 = true;  // every index in the space is < 2^31: FastDivmod is exact
  FastDivmod fast[kMaxIndexDims];
  int64_t sizes[kMaxIndexDims] = {};
  int64_t strides[kMaxIndexDims][N] = {};

  C10_HOST_DEVICE inline void offsets(int64_t i, int64_t out[N]) const {
#pragma unroll
    for (int t = 0; t < N; ++t) out[t] = 0;
    // The loops are unrolled over the compile-time bound with a guard, so the
    // arrays are indexed by constants and stay in the parameter bank.
    if (use32) {
      uint32_t rest = static_cast<uint32_t>(i);
#pragma unroll
      for (int d = 0; d < kMaxIndexDims; ++d) {
        if (d >= ndim) break;
        uint32_t idx = rest;
        if (d + 1 < ndim) fast[d].divmod(rest, rest, idx);  // outermost: no division
#pragma unroll
        for (int t = 0; t < N; ++t) out[t] += static_cast<int64_t>(idx) * strides[d][t];
      }
    } else {
      int64_t rest = i;
#pragma unroll
      for (int d = 0; d < kMaxIndexDims; ++d) {
        if (d >= ndim) break;
        int64_t idx = rest;
        if (d + 1 < ndim) {
          idx = rest % sizes[d];
          rest /= sizes[d];
        }
#pragma unroll
        for (int t = 0; t < N; ++t) out[t] += idx * strides[d][t];
      }
    }
  }
};

// Host-side description of an index space, outer dim first, then compiled into a
// RowIndexer. Typical use: the leading dims of the tensors, then the kernel's own
// inner dims (e.g. groups within a row).
template <int N>
struct IndexSpace {
  int ndim = 0;
  int64_t sizes[kMaxIndexDims] = {};
  int64_t strides[kMaxIndexDims][N] = {};

  // Appends a dim inside the ones added so far.
  void add_dim(int64_t size, const int64_t (&dim_strides)[N]) {
    TORCH_INTERNAL_ASSERT(ndim < kMaxIndexDims, "IndexSpace: too many dims");
    sizes[ndim] = size;
    for (int t = 0; t < N; ++t) strides[ndim][t] = dim_strides[t];
    ++ndim;
  }

  // The leading dims of tensors that share their leading sizes (RowOffsets from
  // set_row_strides in checks.h).
  void add_leading(const RowOffsets<N>& rows) {
    for (int d = 0; d < rows.ndim; ++d) {
      int64_t s[N];
      for (int t = 0; t < N; ++t) s[t] = rows.strides[t][d];
      add_dim(rows.sizes[d], s);
    }
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
  }

  RowIndexer<N> build() const {
    // Drop size-1 dims, then merge an outer dim into the inner one kept so far
    // when it steps exactly over it in every tensor.
    int m = 0;
    int64_t sz[kMaxIndexDims];
    int64_t st[kMaxIndexDims][N];
    for (int d = 0; d < ndim; ++d) {
      if (sizes[d] == 1) continue;
      if (m > 0) {
        // Outer dim m-1 (already kept) merges with this inner dim d when
        // stride_outer == stride_inner * size_inner for every tensor.
        bool mergeable = true;
        for (int t = 0; t < N; ++t) {
          mergeable = mergeable && st[m - 1][t] == strides[d][t] * sizes[d];
        }
        if (mergeable) {
          sz[m - 1] *= sizes[d];
          for (int t = 0; t < N; ++t) st[m - 1][t] = strides[d][t];
          continue;
        }
      }
      sz[m] = sizes[d];
      for (int t = 0; t < N; ++t) st[m][t] = strides[d][t];
      ++m;
    }
    RowIndexer<N> r;
    r.ndim = m;
    const int64_t total = numel();
    r.use32 = total < (int64_t{1} << 31);
    for (int k = 0; k < m; ++k) {  // reverse: innermost first
      const int d = m - 1 - k;
      r.sizes[k] = sz[d];
      for (int t = 0; t < N; ++t) r.strides[k][t] = st[d][t];
      if (r.use32) r.fast[k] = FastDivmod(static_cast<uint32_t>(sz[d]));
    }
    return r;
  }
};

}  // namespace kvcompact

// Row addressing for tensors viewed as [rows, D] with arbitrary leading strides.
//
// Keys arrive as transposed views ([B, T, H, D] storage seen as [B, H, T, D]) and
// cache appends write into strided slices of a larger buffer, so kernels never
// assume contiguity in the leading dims. A RowOffsets unravels a flat row index
// into the leading multi-index once and applies each tensor's strides to it; the
// last dim keeps its own stride per tensor (1 in every hot path).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace kvcompact {

constexpr int kMaxLeadingDims = 8;

template <int NumTensors>
struct RowOffsets {
  int ndim = 0;                                      // leading dims (all but the last)
  int64_t sizes[kMaxLeadingDims] = {};               // shared leading sizes
  int64_t strides[NumTensors][kMaxLeadingDims] = {}; // per tensor, in elements

  // Element offset of `row`'s first element in each tensor.
  C10_HOST_DEVICE inline void offsets(int64_t row, int64_t out[NumTensors]) const {
    for (int t = 0; t < NumTensors; ++t) {
      out[t] = 0;
    }
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t idx = row % sizes[d];
      row /= sizes[d];
      for (int t = 0; t < NumTensors; ++t) {
        out[t] += idx * strides[t][d];
      }
    }
  }
};

}  // namespace kvcompact

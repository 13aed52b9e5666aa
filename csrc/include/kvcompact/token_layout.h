// Token-major addressing for the [B, H, T, ...] tensors that compact_ and move_ edit.
//
// compact_ and move_ never look at values: a token is an opaque block of bytes,
// so one kernel serves every dtype of a cache group (bf16 keys, fp8 codes, fp32
// scales, int64 positions). A token block is the tensor's trailing dims, seen
// as `chunks` runs of `chunk_bytes` contiguous bytes: one run when the trailing
// dims are contiguous (every cache layout), more for strided views (down to one
// element per run). The host side (token_args.h) merges and orders the trailing
// dims; this header is the part device code needs too.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace kvcompact {

// Trailing dims left after size-1 dims are dropped and mergeable dims merged.
constexpr int kMaxTrailingDims = 6;

struct TokenLayout {
  char* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_t = 0;  // bytes
  int64_t chunk_bytes = 0;                           // one contiguous run
  int64_t chunks = 0;                                // runs per token (0: empty tensor)
  int outer_ndim = 0;                                // trailing dims iterated over runs
  int64_t outer_sizes[kMaxTrailingDims] = {};
  int64_t outer_strides[kMaxTrailingDims] = {};      // bytes
  int vec = 1;  // largest power of two <= 16 dividing the address, every stride and chunk_bytes

  C10_HOST_DEVICE inline int64_t token_bytes() const { return chunk_bytes * chunks; }

  // Byte offset of token `t` of row (b, h).
  C10_HOST_DEVICE inline int64_t token_offset(int64_t b, int64_t h, int64_t t) const {
    return b * stride_b + h * stride_h + t * stride_t;
  }

  // Byte offset, inside a token block, of run `c` (row-major over outer dims).
  C10_HOST_DEVICE inline int64_t chunk_offset(int64_t c) const {
    int64_t off = 0;
    for (int d = outer_ndim - 1; d >= 0; --d) {
      off += (c % outer_sizes[d]) * outer_strides[d];
      c /= outer_sizes[d];
    }
    return off;
  }

  // Tokens of a row are one contiguous byte range (memmove-able as a whole).
  C10_HOST_DEVICE inline bool tokens_contiguous() const {
    return chunks == 1 && stride_t == chunk_bytes;
  }
};

}  // namespace kvcompact

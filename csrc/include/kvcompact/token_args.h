// Host-side argument checks for compact_ and move_, shared by the CPU and CUDA
// backends so both accept and reject exactly the same inputs with the same
// messages (the CUDA backend validates keep_idx values on the device and hands
// the first offender to the same message builder).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvcompact/checks.h"
#include "kvcompact/token_layout.h"

namespace kvcompact {

// A validated group of aligned token tensors. `layouts` skips tensors with no
// elements (nothing to move); `device` is the group's device.
struct TokenGroup {
  int64_t B = 0, H = 0, T = 0;
  c10::Device device{c10::kCPU};
  std::vector<TokenLayout> layouts;
};

// Builds the byte-level view of one [B, H, T, ...] tensor (see token_layout.h).
inline TokenLayout make_token_layout(const at::Tensor& t) {
  TokenLayout L;
  const int64_t elem = static_cast<int64_t>(t.element_size());
  L.data = static_cast<char*>(t.data_ptr());
  L.stride_b = t.stride(0) * elem;
  L.stride_h = t.stride(1) * elem;
  L.stride_t = t.stride(2) * elem;

  // Trailing dims, innermost last: drop size-1 dims, merge dims that are
  // contiguous with respect to each other.
  std::vector<int64_t> sizes, strides;
  bool empty = false;
  for (int64_t d = 3; d < t.dim(); ++d) {
    if (t.size(d) == 0) empty = true;
    if (t.size(d) == 1) continue;
    const int64_t sz = t.size(d), st = t.stride(d) * elem;
    if (!sizes.empty() && strides.back() == st * sz) {
      sizes.back() *= sz;
      strides.back() = st;
    } else {
      sizes.push_back(sz);
      strides.push_back(st);
    }
  }
  if (empty || t.numel() == 0) {
    L.chunks = 0;
    return L;
  }
  if (!sizes.empty() && strides.back() == elem) {
    L.chunk_bytes = sizes.back() * elem;  // innermost dim is one contiguous run
    sizes.pop_back();
    strides.pop_back();
  } else {
    L.chunk_bytes = elem;  // strided innermost dim (or no trailing dims): one element per run
  }
  TORCH_CHECK_VALUE(static_cast<int>(sizes.size()) <= kMaxTrailingDims,
                    "token tensors support at most ", kMaxTrailingDims,
                    " non-mergeable trailing dims; got ", sizes.size());
  L.outer_ndim = static_cast<int>(sizes.size());
  L.chunks = 1;
  for (int d = 0; d < L.outer_ndim; ++d) {
    L.outer_sizes[d] = sizes[d];
    L.outer_strides[d] = strides[d];
    L.chunks *= sizes[d];
  }

  // Vector width: every address the copy touches is a multiple of it.
  uint64_t bits = reinterpret_cast<uintptr_t>(L.data) | static_cast<uint64_t>(L.chunk_bytes);
  if (t.size(0) > 1) bits |= static_cast<uint64_t>(L.stride_b);
  if (t.size(1) > 1) bits |= static_cast<uint64_t>(L.stride_h);
  if (t.size(2) > 1) bits |= static_cast<uint64_t>(L.stride_t);
  for (int d = 0; d < L.outer_ndim; ++d) bits |= static_cast<uint64_t>(L.outer_strides[d]);
  L.vec = 16;
  while (L.vec > 1 && (bits % static_cast<uint64_t>(L.vec)) != 0) L.vec /= 2;
  return L;
}

// tensors: non-empty list of [B, H, T, ...] tensors sharing B, H, T and a device,
// none self-overlapping (expanded views) and no two sharing memory.
inline TokenGroup check_token_tensors(const char* op, at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": `tensors` must be a non-empty list");
  TokenGroup g;
  const at::Tensor& first = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), op, ": `tensors`[", i, "] is undefined");
    TORCH_CHECK_VALUE(t.dim() >= 3, op, ": `tensors`[", i,
                      "] must be [B, H, T, ...] (at least 3 dims); got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": `tensors`[", i, "] is on ",
                      t.device(), " but `tensors`[0] is on ", first.device(),
                      "; all tensors must be on one device");
    TORCH_CHECK_VALUE(t.size(0) == first.size(0) && t.size(1) == first.size(1) &&
                          t.size(2) == first.size(2),
                      op, ": `tensors`[", i, "] has [B, H, T] = ", t.sizes().slice(0, 3),
                      " but `tensors`[0] has ", first.sizes().slice(0, 3),
                      "; all tensors must share B, H and T");
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": `tensors`[",
                      i, "] has elements sharing memory (an expanded view?); it cannot be "
                      "edited in place");
    for (size_t j = 0; j < i; ++j) {
      const auto status = at::get_overlap_status(t, tensors[j]);
      TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full &&
                            status != at::MemOverlapStatus::Partial,
                        op, ": `tensors`[", j, "] and `tensors`[", i,
                        "] share memory; each tensor must appear once");
    }
  }
  g.B = first.size(0);
  g.H = first.size(1);
  g.T = first.size(2);
  g.device = first.device();
  for (const at::Tensor& t : tensors) {
    TokenLayout L = make_token_layout(t);
    if (L.chunks > 0 && g.B * g.H * g.T > 0) g.layouts.push_back(L);
  }
  return g;
}

// keep_idx: int64 [B, H, K] with K <= T, on the group's device. Returns K.
inline int64_t check_keep_idx_meta(const char* op, const at::Tensor& keep_idx,
                                   const TokenGroup& g) {
  TORCH_CHECK_TYPE(keep_idx.scalar_type() == c10::ScalarType::Long, op,
                   ": `keep_idx` must be int64; got ", keep_idx.scalar_type());
  TORCH_CHECK_VALUE(keep_idx.dim() == 3, op, ": `keep_idx` must be [B, H, K] (3 dims); got ",
                    keep_idx.dim(), " dims, shape ", keep_idx.sizes());
  TORCH_CHECK_VALUE(keep_idx.device() == g.device, op, ": `keep_idx` is on ", keep_idx.device(),
                    " but `tensors` are on ", g.device, "; they must be on one device");
  TORCH_CHECK_VALUE(keep_idx.size(0) == g.B && keep_idx.size(1) == g.H, op,
                    ": `keep_idx` must be [B, H, K] = [", g.B, ", ", g.H,
                    ", K]; got shape ", keep_idx.sizes());
  const int64_t K = keep_idx.size(2);
  TORCH_CHECK_VALUE(K <= g.T, op, ": `keep_idx` keeps K = ", K,
                    " tokens per row but the tensors hold only T = ", g.T);
  return K;
}

// What is wrong with one keep_idx entry. Kinds are shared with the CUDA
// validation kernel, which reports the first offender as flat * 4 + kind.
enum KeepIdxError : int { kKeepIdxOk = 0, kKeepIdxOutOfRange = 1, kKeepIdxNotIncreasing = 2 };

[[noreturn]] inline void raise_keep_idx_error(const char* op, int kind, int64_t b, int64_t h,
                                              int64_t j, int64_t value, int64_t prev,
                                              int64_t T) {
  if (kind == kKeepIdxOutOfRange) {
    TORCH_CHECK_INDEX(false, op, ": `keep_idx`[", b, ", ", h, ", ", j, "] = ", value,
                      " is out of range [0, ", T, ")", value < 0 ? " (negative)" : "");
  }
  TORCH_CHECK_VALUE(false, op, ": `keep_idx` must be strictly increasing along each row; row (",
                    b, ", ", h, ") has keep_idx[", j - 1, "] = ", prev, " then keep_idx[", j,
                    "] = ", value, value == prev ? " (duplicate)" : "");
}

// Value checks for a host-resident keep_idx, in row order (the first offender
// in flat order is reported, as on CUDA).
inline void validate_keep_idx_host(const char* op, const at::Tensor& keep_idx, int64_t T) {
  const int64_t B = keep_idx.size(0), H = keep_idx.size(1), K = keep_idx.size(2);
  const int64_t* k = keep_idx.const_data_ptr<int64_t>();
  const int64_t sb = keep_idx.stride(0), sh = keep_idx.stride(1), sk = keep_idx.stride(2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t* row = k + b * sb + h * sh;
      int64_t prev = -1;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t v = row[j * sk];
        if (v < 0 || v >= T) raise_keep_idx_error(op, kKeepIdxOutOfRange, b, h, j, v, prev, T);
        if (j > 0 && v <= prev) {
          raise_keep_idx_error(op, kKeepIdxNotIncreasing, b, h, j, v, prev, T);
        }
        prev = v;
      }
    }
  }
}

// move_ ranges: 0 <= src_start <= src_end <= T and the destination fits in T.
inline void check_move_range(const char* op, int64_t T, int64_t src_start, int64_t src_end,
                             int64_t dst_start) {
  TORCH_CHECK_VALUE(src_start <= src_end, op, ": `src_start` (", src_start,
                    ") must be <= `src_end` (", src_end, "); the range is reversed");
  TORCH_CHECK_INDEX(src_start >= 0 && src_start <= T, op, ": `src_start` = ", src_start,
                    " is out of range [0, ", T, "]");
  TORCH_CHECK_INDEX(src_end >= 0 && src_end <= T, op, ": `src_end` = ", src_end,
                    " is out of range [0, ", T, "]");
  TORCH_CHECK_INDEX(dst_start >= 0 && dst_start + (src_end - src_start) <= T, op,
                    ": `dst_start` = ", dst_start, " puts the ", src_end - src_start,
                    "-token destination outside [0, ", T, ")");
}

}  // namespace kvcompact

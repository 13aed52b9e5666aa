// Argument checks and copy planning for copy_blocks_, shared by the CPU and CUDA
// backends.
//
// A "block" is src[i] / dst[j]: everything but the leading dim, which must be
// contiguous so one block is one byte range. The leading stride may be anything
// that keeps blocks apart (e.g. a slice of a larger [layers, blocks, ...]
// buffer). Consecutive mapping rows (s, d), (s+1, d+1) over densely packed
// blocks are merged into one run, so moving a whole layer is one copy, not
// num_blocks copies.
//
// NOTE: block_mapping must be a CPU tensor: every entry is read on the host to
// compute addresses; a device mapping would need a device sync per call.
// NOTE: copies within one call are unordered (the CUDA path batches them), so a
// destination block may appear only once, and when src and dst are the same
// buffer no block may be both read and written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kvcompact {

struct CopyRun {
  int64_t src_block;
  int64_t dst_block;
  int64_t num_blocks;  // consecutive blocks on both sides
};

struct CopyBlocksPlan {
  int64_t block_bytes = 0;
  int64_t src_stride_bytes = 0;  // between consecutive blocks
  int64_t dst_stride_bytes = 0;
  int64_t num_pairs = 0;         // rows of block_mapping
  std::vector<CopyRun> runs;

  const char* src_block_ptr(const at::Tensor& src, int64_t block) const {
    return static_cast<const char*>(src.const_data_ptr()) + block * src_stride_bytes;
  }
  char* dst_block_ptr(const at::Tensor& dst, int64_t block) const {
    return static_cast<char*>(dst.data_ptr()) + block * dst_stride_bytes;
  }
};

namespace detail {

// Blocks are the trailing dims; they must form one dense byte range.
inline void check_block_contiguous(const char* op, const char* name, const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1) {
      TORCH_CHECK_VALUE(t.stride(d) == expected, op, ": each block of `", name,
                        "` (all dims but the first) must be contiguous; got sizes ",
                        t.sizes(), " and strides ", t.strides(),
                        " (use .contiguous() or allocate blocks densely)");
    }
    expected *= t.size(d);
  }
  if (t.size(0) > 1) {
    TORCH_CHECK_VALUE(t.stride(0) >= expected, op, ": blocks of `", name,
                      "` overlap: stride(0) = ", t.stride(0), " is less than the block size ",
                      expected, " elements");
  }
}

}  // namespace detail

inline CopyBlocksPlan plan_copy_blocks(const char* op, const at::Tensor& src,
                                       const at::Tensor& dst, const at::Tensor& block_mapping) {
  // block_mapping: int64 [N, 2] on the CPU.
  TORCH_CHECK_VALUE(block_mapping.device().is_cpu(), op,
                    ": `block_mapping` must be a CPU tensor (reading it on the device would "
                    "need a sync per call); got one on ", block_mapping.device());
  TORCH_CHECK_TYPE(block_mapping.scalar_type() == c10::ScalarType::Long, op,
                   ": `block_mapping` must be int64; got ", block_mapping.scalar_type());
  TORCH_CHECK_VALUE(block_mapping.dim() == 2 && block_mapping.size(1) == 2, op,
                    ": `block_mapping` must have shape [N, 2] (src block, dst block); got ",
                    block_mapping.sizes());
  // src / dst: [num_blocks, ...] with equal block shape and dtype.
  TORCH_CHECK_VALUE(src.dim() >= 1, op, ": `src` must be [num_blocks, ...]; got a 0-d tensor");
  TORCH_CHECK_VALUE(dst.dim() >= 1, op, ": `dst` must be [num_blocks, ...]; got a 0-d tensor");
  TORCH_CHECK_TYPE(src.scalar_type() == dst.scalar_type(), op, ": `src` (", src.scalar_type(),
                   ") and `dst` (", dst.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(src.sizes().slice(1) == dst.sizes().slice(1), op,
                    ": `src` and `dst` must have the same block shape (all dims but the "
                    "first); got ", src.sizes(), " and ", dst.sizes());
  detail::check_block_contiguous(op, "src", src);
  detail::check_block_contiguous(op, "dst", dst);

  CopyBlocksPlan plan;
  const int64_t item = static_cast<int64_t>(src.element_size());
  int64_t block_numel = 1;
  for (int64_t d = 1; d < src.dim(); ++d) block_numel *= src.size(d);
  plan.block_bytes = block_numel * item;
  plan.src_stride_bytes = src.stride(0) * item;
  plan.dst_stride_bytes = dst.stride(0) * item;
  plan.num_pairs = block_mapping.size(0);

  const int64_t n_src = src.size(0), n_dst = dst.size(0);
  const at::Tensor mapping = block_mapping.contiguous();
  const int64_t* m = mapping.const_data_ptr<int64_t>();
  std::vector<uint8_t> written(static_cast<size_t>(n_dst), 0);
  for (int64_t k = 0; k < plan.num_pairs; ++k) {
    const int64_t s = m[2 * k], d = m[2 * k + 1];
    TORCH_CHECK_INDEX(s >= 0 && s < n_src, op, ": `block_mapping`[", k, ", 0] = ", s,
                      " is out of range for `src` with ", n_src, " blocks");
    TORCH_CHECK_INDEX(d >= 0 && d < n_dst, op, ": `block_mapping`[", k, ", 1] = ", d,
                      " is out of range for `dst` with ", n_dst, " blocks");
    TORCH_CHECK_VALUE(!written[d], op, ": `block_mapping` names dst block ", d,
                      " more than once (copies in one call are unordered)");
    written[d] = 1;
  }

  // The same buffer on both sides: no block may be read and written.
  const bool same_storage = src.has_storage() && dst.has_storage() &&
                            src.storage().is_alias_of(dst.storage());
  if (same_storage && plan.num_pairs > 0 && plan.block_bytes > 0) {
    TORCH_CHECK_VALUE(src.const_data_ptr() == dst.const_data_ptr() &&
                          src.stride(0) == dst.stride(0),
                      op, ": `src` and `dst` share storage with different layouts; "
                      "use the same tensor for both or copy through a separate buffer");
    for (int64_t k = 0; k < plan.num_pairs; ++k) {
      TORCH_CHECK_VALUE(!written[m[2 * k]], op, ": block ", m[2 * k],
                        " of the shared `src`/`dst` buffer is both read and written");
    }
  }
  if (plan.block_bytes == 0) return plan;

  // Merge consecutive pairs over densely packed blocks into runs.
  const bool src_dense = plan.src_stride_bytes == plan.block_bytes;
  const bool dst_dense = plan.dst_stride_bytes == plan.block_bytes;
  for (int64_t k = 0; k < plan.num_pairs; ++k) {
    const int64_t s = m[2 * k], d = m[2 * k + 1];
    if (!plan.runs.empty() && src_dense && dst_dense) {
      CopyRun& last = plan.runs.back();
      if (s == last.src_block + last.num_blocks && d == last.dst_block + last.num_blocks) {
        ++last.num_blocks;
        continue;
      }
    }
    plan.runs.push_back({s, d, 1});
  }
  return plan;
}

}  // namespace kvcompact

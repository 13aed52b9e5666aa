// CPU copy_blocks_: host <-> host block copies (pinned or pageable).
//
// Strategy: the shared planner validates the mapping and merges consecutive
// blocks into runs; each run is cut into pieces of at most kPieceBytes and the
// pieces are memcpy'd by at::parallel_for, with a grain that gives each task at
// least ~1 MiB so a small copy stays on the calling thread (thread wake-up costs
// more than copying a few blocks). memcpy is already at memory bandwidth on one
// core for large pieces; threads help when a socket has more bandwidth than one
// core can pull.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "kvcompact/copy_blocks_args.h"

namespace kvcompact {
namespace {

constexpr int64_t kPieceBytes = int64_t{1} << 20;

struct Piece {
  const char* src;
  char* dst;
  int64_t bytes;
};

void copy_blocks_cpu(const at::Tensor& src, const at::Tensor& dst,
                     const at::Tensor& block_mapping) {
  constexpr const char* op = "copy_blocks_";
  TORCH_CHECK_VALUE(src.device().is_cpu() && dst.device().is_cpu(), op,
                    ": the CPU kernel needs `src` and `dst` in host memory; got ", src.device(),
                    " and ", dst.device());
  const CopyBlocksPlan plan = plan_copy_blocks(op, src, dst, block_mapping);
  if (plan.runs.empty()) return;

  std::vector<Piece> pieces;
  pieces.reserve(plan.runs.size());
  for (const CopyRun& run : plan.runs) {
    const char* s = plan.src_block_ptr(src, run.src_block);
    char* d = plan.dst_block_ptr(dst, run.dst_block);
    for (int64_t left = run.num_blocks * plan.block_bytes; left > 0;) {
      const int64_t bytes = std::min(left, kPieceBytes);
      pieces.push_back({s, d, bytes});
      s += bytes;
      d += bytes;
      left -= bytes;
    }
  }
  const int64_t n = static_cast<int64_t>(pieces.size());
  const int64_t piece_bytes = std::min(plan.block_bytes, kPieceBytes);
  const int64_t grain = std::max<int64_t>(1, kPieceBytes / std::max<int64_t>(1, piece_bytes));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(pieces[i].dst, pieces[i].src, static_cast<size_t>(pieces[i].bytes));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CPU, m) {
  m.impl("copy_blocks_", &copy_blocks_cpu);
}

}  // namespace kvcompact

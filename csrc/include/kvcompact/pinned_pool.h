// PinnedPool: one page-locked host allocation, carved into tensors.
//
// Why: an async host<->device copy is only async (and only runs at full DMA
// speed) when the host side is page-locked, and pinning is slow (it maps and
// locks every page, often milliseconds per GiB) and fragments badly when done
// per tensor. The offload pipeline therefore pins one range up front and hands
// out 256-byte-aligned sub-ranges as ordinary CPU tensors.
//
// Lifetime design (safe by construction, no "remember to call release"):
//  - every handed-out tensor's storage owns a Lease that holds a strong
//    reference to the pool, so the pinned range outlives every tensor viewing
//    it, whatever order Python frees things in;
//  - when the storage dies (the last tensor/view is gone) the lease returns
//    its range to the free list;
//  - release(t) is an explicit early return that is still safe: it refuses
//    while other views of the block are alive, then detaches `t` from the
//    block (t becomes an empty tensor) so no Python object can reach memory
//    that may be handed out again.
// What it cannot see is a copy still in flight on a CUDA stream: callers that
// issue async copies must keep the tensor alive until the copy's event has
// completed (kvcompact.offload's prefetcher and park handles do).
//
// In CUDA builds with a usable device the range comes from cudaHostAlloc
// (portable + mapped, so a kernel may also read it over PCIe); otherwise (CPU
// builds, no device) from aligned_alloc, so CI runs the same code paths.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvcompact/block_allocator.h"

namespace kvcompact {

class PinnedPoolImpl : public torch::CustomClassHolder {
 public:
  static constexpr size_t kAlignment = 256;

  PinnedPoolImpl(int64_t capacity_bytes, bool allow_pageable_fallback);
  ~PinnedPoolImpl() override;
  PinnedPoolImpl(const PinnedPoolImpl&) = delete;
  PinnedPoolImpl& operator=(const PinnedPoolImpl&) = delete;

  // A contiguous CPU tensor of `shape`/`dtype` on a fresh range, or nullopt
  // when no free range is large enough. `self` is this pool (the lease keeps
  // it alive).
  static std::optional<at::Tensor> try_tensor(const c10::intrusive_ptr<PinnedPoolImpl>& self,
                                              const std::vector<int64_t>& shape,
                                              c10::ScalarType dtype);
  // Same, raising torch.OutOfMemoryError naming the request and free bytes.
  static at::Tensor tensor(const c10::intrusive_ptr<PinnedPoolImpl>& self,
                           const std::vector<int64_t>& shape, c10::ScalarType dtype);

  // Returns `t`'s block now; `t` becomes an empty tensor. ValueError if `t` was
  // not handed out by this pool, was already released, or other views are alive.
  void release(const at::Tensor& t);
  bool owns(const at::Tensor& t) const;

  int64_t capacity_bytes() const;
  int64_t used_bytes() const;
  int64_t free_bytes() const;
  int64_t largest_free_block() const;
  int64_t num_allocations() const;
  bool pinned() const { return pinned_; }
  const std::string& backing() const { return backing_; }

  // Called by a lease's deleter when its storage dies.
  void return_block(size_t offset);

 private:
  size_t checked_nbytes(const std::vector<int64_t>& shape, c10::ScalarType dtype) const;

  char* base_ = nullptr;
  bool pinned_ = false;
  std::string backing_;  // how the range was obtained, for error messages and repr
  mutable std::mutex mutex_;
  BlockAllocator allocator_;
};

}  // namespace kvcompact

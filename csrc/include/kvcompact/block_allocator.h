// Best-fit free-list allocator over one fixed byte range, with coalescing.
//
// Torch-free and not thread-safe on its own (PinnedPool holds a mutex around
// it), so it can be unit-tested in plain C++. Offsets and sizes are bytes;
// every allocation is rounded up to `alignment` (a power of two) and starts at
// a multiple of it, so handing out [offset, offset + size) ranges that never
// overlap is the whole contract.
//
// Data structures: `free_by_offset_` (offset -> size) finds the neighbours of a
// returned range in O(log n) for coalescing; `free_by_size_` ((size, offset))
// finds the smallest range that fits in O(log n) (best fit keeps large ranges
// intact for the large per-layer tensors the offload pipeline asks for).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <utility>

namespace kvcompact {

class BlockAllocator {
 public:
  static constexpr size_t kNoFit = static_cast<size_t>(-1);

  BlockAllocator(size_t capacity, size_t alignment)
      : capacity_(capacity / alignment * alignment), alignment_(alignment) {
    if (capacity_ > 0) insert_free(0, capacity_);
  }

  size_t capacity() const { return capacity_; }
  size_t used() const { return used_; }
  size_t free_bytes() const { return capacity_ - used_; }
  size_t num_allocations() const { return allocated_.size(); }
  size_t largest_free() const {
    return free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
  }
  size_t round_up(size_t nbytes) const {
    const size_t n = nbytes == 0 ? 1 : nbytes;  // every lease has a distinct address
    if (n > capacity_) return kNoFit;
    return (n + alignment_ - 1) / alignment_ * alignment_;
  }

  // Offset of a new range of at least `nbytes`, or kNoFit.
  size_t allocate(size_t nbytes) {
    const size_t size = round_up(nbytes);
    if (size == kNoFit) return kNoFit;
    auto it = free_by_size_.lower_bound({size, 0});
    if (it == free_by_size_.end()) return kNoFit;
    const size_t range_size = it->first, offset = it->second;
    erase_free(offset, range_size);
    if (range_size > size) insert_free(offset + size, range_size - size);
    allocated_.emplace(offset, size);
    used_ += size;
    return offset;
  }

  // Returns the range that starts at `offset`; false if none is allocated there.
  bool release(size_t offset) {
    auto it = allocated_.find(offset);
    if (it == allocated_.end()) return false;
    size_t start = offset, size = it->second;
    allocated_.erase(it);
    used_ -= size;
    // Coalesce with the free range that ends where this one starts ...
    auto next = free_by_offset_.lower_bound(start);
    if (next != free_by_offset_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == start) {
        start = prev->first;
        size += prev->second;
        erase_free(prev->first, prev->second);
      }
    }
    // ... and with the one that starts where it ends.
    next = free_by_offset_.find(start + size);
    if (next != free_by_offset_.end()) {
      const size_t next_size = next->second;
      erase_free(start + size, next_size);
      size += next_size;
    }
    insert_free(start, size);
    return true;
  }

  bool is_allocated(size_t offset) const { return allocated_.count(offset) != 0; }
  size_t num_free_ranges() const { return free_by_offset_.size(); }

 private:
  void insert_free(size_t offset, size_t size) {
    free_by_offset_.emplace(offset, size);
    free_by_size_.emplace(size, offset);
  }
  void erase_free(size_t offset, size_t size) {
    free_by_offset_.erase(offset);
    free_by_size_.erase({size, offset});
  }

  size_t capacity_;
  size_t alignment_;
  size_t used_ = 0;
  std::map<size_t, size_t> free_by_offset_;
  std::set<std::pair<size_t, size_t>> free_by_size_;
  std::map<size_t, size_t> allocated_;  // offset -> rounded size
};

}  // namespace kvcompact

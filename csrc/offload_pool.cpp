// PinnedPool implementation and its registration as torch.classes.kvcompact.PinnedPool.
//
// The pool is not an operator (it owns state and hands out storage), so it is a
// TorchScript custom class rather than an entry in the schema table. See
// kvcompact/pinned_pool.h for the lifetime design; kvcompact/offload/pool.py
// wraps it for Python users.
#include "kvcompact/pinned_pool.h"

#include <ATen/ops/from_blob.h>
#include <c10/core/Storage.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>

#ifdef KVCOMPACT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvcompact {
namespace {

constexpr size_t kPageBytes = 4096;

// The context of every storage the pool hands out.
struct Lease {
  c10::intrusive_ptr<PinnedPoolImpl> pool;  // keeps the pinned range alive
  size_t offset;
};

void lease_deleter(void* ctx) {
  auto* lease = static_cast<Lease*>(ctx);
  lease->pool->return_block(lease->offset);
  delete lease;  // may drop the last reference and free the whole range
}

// The lease behind `t`'s storage, or nullptr when `t` is not a pool tensor.
Lease* lease_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  const c10::DataPtr& dp = t.storage().data_ptr();
  if (dp.get_deleter() != &lease_deleter) return nullptr;
  return static_cast<Lease*>(dp.get_context());
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

}  // namespace

PinnedPoolImpl::PinnedPoolImpl(int64_t capacity_bytes, bool allow_pageable_fallback)
    : allocator_(capacity_bytes > 0 ? static_cast<size_t>(capacity_bytes) : 0, kAlignment) {
  TORCH_CHECK_VALUE(capacity_bytes >= static_cast<int64_t>(kAlignment),
                    "PinnedPool: `capacity_bytes` must be at least ", kAlignment, "; got ",
                    capacity_bytes);
  const size_t bytes = allocator_.capacity();
  std::string why_pageable = "this build has no CUDA kernels";
#ifdef KVCOMPACT_WITH_CUDA
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();  // clear the sticky-free "no device" error
    why_pageable = "no CUDA device is usable";
  } else {
    void* p = nullptr;
    // Portable: pinned for every device's context. Mapped: kernels may read it
    // directly over PCIe (the small-block copy path).
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
    if (err == cudaSuccess) {
      base_ = static_cast<char*>(p);
      pinned_ = true;
      backing_ = "cudaHostAlloc";
    } else {
      (void)cudaGetLastError();
      TORCH_CHECK_WITH(OutOfMemoryError, allow_pageable_fallback,
                       "PinnedPool: cudaHostAlloc of ", bytes, " bytes failed (",
                       cudaGetErrorString(err),
                       "); pass allow_pageable_fallback=True to use pageable memory instead");
      why_pageable = std::string("cudaHostAlloc failed: ") + cudaGetErrorString(err);
    }
  }
#endif
  if (base_ == nullptr) {
    const size_t rounded = (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    base_ = static_cast<char*>(std::aligned_alloc(kPageBytes, rounded));
    TORCH_CHECK_WITH(OutOfMemoryError, base_ != nullptr, "PinnedPool: could not allocate ",
                     bytes, " bytes of host memory");
    pinned_ = false;
    backing_ = "pageable (" + why_pageable + ")";
  }
}

PinnedPoolImpl::~PinnedPoolImpl() {
  // Every lease holds a reference, so no tensor can still view the range here.
  if (base_ == nullptr) return;
#ifdef KVCOMPACT_WITH_CUDA
  if (pinned_) {
    // At interpreter exit the CUDA runtime may already be torn down; the
    // process is ending, so an error here is not worth a throw from a destructor.
    (void)cudaFreeHost(base_);
    (void)cudaGetLastError();
    return;
  }
#endif
  std::free(base_);
}

size_t PinnedPoolImpl::checked_nbytes(const std::vector<int64_t>& shape,
                                      c10::ScalarType dtype) const {
  size_t numel = 1;
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, "PinnedPool.tensor: `shape` must be non-negative; got ",
                      shape_str(shape));
    TORCH_CHECK_VALUE(s == 0 || numel <= std::numeric_limits<size_t>::max() / s,
                      "PinnedPool.tensor: `shape` ", shape_str(shape), " overflows");
    numel *= static_cast<size_t>(s);
  }
  const size_t item = c10::elementSize(dtype);
  TORCH_CHECK_VALUE(numel <= std::numeric_limits<size_t>::max() / item,
                    "PinnedPool.tensor: `shape` ", shape_str(shape), " overflows");
  return numel * item;
}

std::optional<at::Tensor> PinnedPoolImpl::try_tensor(
    const c10::intrusive_ptr<PinnedPoolImpl>& self, const std::vector<int64_t>& shape,
    c10::ScalarType dtype) {
  const size_t nbytes = self->checked_nbytes(shape, dtype);
  size_t offset;
  {
    std::lock_guard<std::mutex> lock(self->mutex_);
    offset = self->allocator_.allocate(nbytes);
  }
  if (offset == BlockAllocator::kNoFit) return std::nullopt;
  auto* lease = new Lease{self, offset};
  // From here the lease owns the range: if from_blob throws, its deleter (run
  // by the DataPtr) returns it; if it throws before taking ownership, we do.
  try {
    return at::for_blob(self->base_ + offset, shape)
        .context(lease, &lease_deleter)
        .options(at::TensorOptions().dtype(dtype).device(at::kCPU))
        .make_tensor();
  } catch (...) {
    lease_deleter(lease);
    throw;
  }
}

at::Tensor PinnedPoolImpl::tensor(const c10::intrusive_ptr<PinnedPoolImpl>& self,
                                  const std::vector<int64_t>& shape, c10::ScalarType dtype) {
  auto t = try_tensor(self, shape, dtype);
  if (t.has_value()) return *std::move(t);
  const size_t nbytes = self->checked_nbytes(shape, dtype);
  TORCH_CHECK_WITH(OutOfMemoryError, false, "PinnedPool: cannot allocate ", nbytes,
                   " bytes for a ", dtype, " tensor of shape ", shape_str(shape), ": ",
                   self->free_bytes(), " bytes free of ", self->capacity_bytes(),
                   " (largest free range ", self->largest_free_block(), " bytes)");
}

void PinnedPoolImpl::release(const at::Tensor& t) {
  Lease* lease = lease_of(t);
  TORCH_CHECK_VALUE(lease != nullptr && lease->pool.get() == this,
                    "PinnedPool.release: `t` was not handed out by this pool (a foreign "
                    "tensor, or one already released)");
  c10::Storage storage = t.storage();
  // `storage` (this local) plus one reference per tensor viewing the block.
  const size_t views = storage.use_count() - 1;
  TORCH_CHECK_VALUE(views == 1, "PinnedPool.release: ", views - 1,
                    " other tensor(s) still view this block; drop them (or release the "
                    "last one) so no live tensor can reach memory the pool hands out again");
  // Detach `t` from the block: it becomes an empty CPU tensor of the same dtype.
  auto* impl = t.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(c10::Storage(c10::Storage::use_byte_size_t(), 0,
                                            c10::DataPtr(nullptr, c10::Device(c10::kCPU)),
                                            nullptr, /*resizable=*/false));
  impl->set_storage_offset(0);
  impl->set_sizes_contiguous({0});
  // `storage` was the last reference: its destructor runs lease_deleter,
  // which takes mutex_ (not held here).
}

bool PinnedPoolImpl::owns(const at::Tensor& t) const {
  Lease* lease = lease_of(t);
  return lease != nullptr && lease->pool.get() == this;
}

void PinnedPoolImpl::return_block(size_t offset) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Runs inside a storage deleter (noexcept): report, never throw.
  if (!allocator_.release(offset)) {
    std::fprintf(stderr, "kvcompact PinnedPool: internal error: offset %zu returned twice\n",
                 offset);
  }
}

int64_t PinnedPoolImpl::capacity_bytes() const {
  return static_cast<int64_t>(allocator_.capacity());  // immutable after construction
}
int64_t PinnedPoolImpl::used_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(allocator_.used());
}
int64_t PinnedPoolImpl::free_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(allocator_.free_bytes());
}
int64_t PinnedPoolImpl::largest_free_block() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(allocator_.largest_free());
}
int64_t PinnedPoolImpl::num_allocations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(allocator_.num_allocations());
}

TORCH_LIBRARY_FRAGMENT(kvcompact, m) {
  using Self = c10::intrusive_ptr<PinnedPoolImpl>;
  m.class_<PinnedPoolImpl>("PinnedPool")
      .def(torch::init<int64_t, bool>())
      .def("tensor",
           [](const Self& self, std::vector<int64_t> shape, c10::ScalarType dtype) {
             return PinnedPoolImpl::tensor(self, shape, dtype);
           })
      .def("try_tensor",
           [](const Self& self, std::vector<int64_t> shape, c10::ScalarType dtype) {
             return PinnedPoolImpl::try_tensor(self, shape, dtype);
           })
      .def("release", [](const Self& self, at::Tensor t) { self->release(t); })
      .def("owns", [](const Self& self, at::Tensor t) { return self->owns(t); })
      .def("capacity_bytes", [](const Self& self) { return self->capacity_bytes(); })
      .def("used_bytes", [](const Self& self) { return self->used_bytes(); })
      .def("free_bytes", [](const Self& self) { return self->free_bytes(); })
      .def("largest_free_block", [](const Self& self) { return self->largest_free_block(); })
      .def("num_allocations", [](const Self& self) { return self->num_allocations(); })
      .def("pinned", [](const Self& self) { return self->pinned(); })
      .def("backing", [](const Self& self) { return self->backing(); });
}

}  // namespace kvcompact

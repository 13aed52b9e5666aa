// Fixed-width vector loads and stores for memory-bound kernels.
//
// A warp moves memory best in 16-byte accesses per thread (LDG.128 / STG.128),
// which the compiler emits only for types it knows are 16-byte aligned. These
// helpers move N elements of T as N * sizeof(T) / 16 such accesses; callers
// guarantee the alignment (checked on the host with is_aligned16 and
// strides_aligned16), and fall back to scalar code when it does not hold.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace kvcompact {

constexpr int kVecBytes = 16;

// 16 bytes of T, aligned so one access moves all of it.
template <typename T>
struct alignas(kVecBytes) Vec16 {
  static constexpr int kSize = kVecBytes / static_cast<int>(sizeof(T));
  T val[kSize];
};

// Loads N consecutive elements at `ptr` (16-byte aligned; N * sizeof(T) a
// multiple of 16) into registers.
template <typename T, int N>
C10_HOST_DEVICE inline void load_vec(const T* ptr, T (&out)[N]) {
  using V = Vec16<T>;
  static_assert((N * sizeof(T)) % kVecBytes == 0, "load_vec: N * sizeof(T) must be 16k");
  constexpr int kPer = V::kSize;
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    const V chunk = reinterpret_cast<const V*>(ptr)[v];
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[v * kPer + j] = chunk.val[j];
  }
}

// Stores N consecutive elements to `ptr` (same alignment contract as load_vec).
template <typename T, int N>
C10_HOST_DEVICE inline void store_vec(T* ptr, const T (&in)[N]) {
  using V = Vec16<T>;
  static_assert((N * sizeof(T)) % kVecBytes == 0, "store_vec: N * sizeof(T) must be 16k");
  constexpr int kPer = V::kSize;
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    V chunk;
#pragma unroll
    for (int j = 0; j < kPer; ++j) chunk.val[j] = in[v * kPer + j];
    reinterpret_cast<V*>(ptr)[v] = chunk;
  }
}

inline bool is_aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0;
}

// True when every stride (in elements of `elem_bytes`) of a dim with more than
// one element keeps 16-byte alignment, so aligned row starts stay aligned.
inline bool strides_aligned16(int ndim, const int64_t* sizes, const int64_t* strides,
                              int64_t elem_bytes) {
  for (int d = 0; d < ndim; ++d) {
    if (sizes[d] > 1 && (strides[d] * elem_bytes) % kVecBytes != 0) return false;
  }
  return true;
}

}  // namespace kvcompact

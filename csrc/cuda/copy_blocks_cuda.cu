// CUDA copy_blocks_: block copies device <-> pinned host, device <-> device, on
// the current stream.
//
// Why this shape:
//  - Host <-> device goes through the copy engines (DMA), never through SMs:
//    the point of offload is to move KV *while* attention and MLPs run, and a
//    copy kernel reading host memory over PCIe would take SMs from them. One
//    cudaMemcpyAsync per block costs a driver call each (~2-5 us), which caps
//    small blocks far below PCIe speed (vLLM measured ~3 GB/s for per-block
//    copies), so:
//      1. the planner first merges consecutive blocks into runs (a whole layer
//         moved to a staging buffer is one copy);
//      2. the runs are submitted with one cudaMemcpyBatchAsync (CUDA >= 12.8;
//         its signature dropped the `failIdx` argument in 13.0), flagged
//         PreferOverlapWithCompute. The batch API rejects the legacy NULL
//         stream, which is torch's default stream, so there the batch runs on
//         a per-thread side stream bridged with two events (current -> side ->
//         current): the caller still sees plain current-stream ordering and the
//         caching allocator's stream-ordered reuse stays correct;
//      3. without the batch API (older runtime, or a driver that reports it
//         unsupported, remembered after the first failure) a loop of
//         cudaMemcpyAsync(cudaMemcpyDefault).
//  - Device <-> device with many small blocks uses a copy kernel (one CTA row
//    per block pair, 16-byte vector loads when the addresses allow): a kernel
//    launch per 480 pairs beats a DMA descriptor per block. Large blocks stay on
//    memcpy. The kernel can also read/write mapped pinned host memory; that path
//    is off by default for the reason above and can be enabled for measurement
//    with KVCOMPACT_COPY_BLOCKS_HOST_KERNEL_MAX_BYTES.
//  - KVCOMPACT_COPY_BLOCKS_PATH=auto|kernel|batch|loop forces a path (benchmarks
//    and tests); `kernel` falls back to memcpy where it cannot apply.
// The thresholds below are first guesses; benchmarks/bench_offload.py measures
// every path so they can be set from an H100 run.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kvcompact/checks.h"
#include "kvcompact/copy_blocks_args.h"

namespace kvcompact {
namespace {

constexpr const char* kOp = "copy_blocks_";

// Device<->device blocks up to this size use the kernel (unless forced).
constexpr int64_t kKernelMaxBlockBytesD2D = 256 * 1024;
// Pairs per kernel launch: the indices travel as a by-value kernel argument,
// kept under the classic 4 KiB parameter limit.
constexpr int kPairsPerLaunch = 480;
constexpr int kThreads = 256;
constexpr int kMaxChunksPerBlock = 16;  // grid.x: CTAs sharing one large block

struct PairBatch {
  int32_t src[kPairsPerLaunch];
  int32_t dst[kPairsPerLaunch];
};

template <typename Vec>
__global__ void copy_blocks_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                   int64_t src_stride, int64_t dst_stride,
                                   int64_t vecs_per_block, PairBatch pairs) {
  const int pair = blockIdx.y;
  const Vec* s = reinterpret_cast<const Vec*>(src + int64_t{pairs.src[pair]} * src_stride);
  Vec* d = reinterpret_cast<Vec*>(dst + int64_t{pairs.dst[pair]} * dst_stride);
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < vecs_per_block;
       i += int64_t{gridDim.x} * blockDim.x) {
    d[i] = s[i];
  }
}

enum class Path { kAuto, kKernel, kBatch, kLoop };

Path forced_path() {
  const char* env = std::getenv("KVCOMPACT_COPY_BLOCKS_PATH");
  if (env == nullptr || std::strcmp(env, "auto") == 0 || env[0] == '\0') return Path::kAuto;
  if (std::strcmp(env, "kernel") == 0) return Path::kKernel;
  if (std::strcmp(env, "batch") == 0) return Path::kBatch;
  if (std::strcmp(env, "loop") == 0) return Path::kLoop;
  TORCH_CHECK_VALUE(false, kOp, ": KVCOMPACT_COPY_BLOCKS_PATH must be auto, kernel, batch or "
                    "loop; got '", env, "'");
}

int64_t host_kernel_max_bytes() {
  const char* env = std::getenv("KVCOMPACT_COPY_BLOCKS_HOST_KERNEL_MAX_BYTES");
  return env == nullptr ? 0 : std::atoll(env);
}

// The address a kernel may use for `t`'s data: itself on the device, the mapped
// alias of pinned host memory, or nullptr (pageable host memory).
const char* kernel_address(const at::Tensor& t) {
  const void* p = t.const_data_ptr();
  if (t.is_cuda()) return static_cast<const char*>(p);
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  if (attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr) return nullptr;
  return static_cast<const char*>(attr.devicePointer);
}

int vector_bytes(std::initializer_list<uint64_t> values) {
  uint64_t bits = 0;
  for (uint64_t v : values) bits |= v;
  for (int w = 16; w > 1; w /= 2) {
    if (bits % w == 0) return w;
  }
  return 1;
}

template <typename Vec>
void launch_kernel(const char* src, char* dst, const CopyBlocksPlan& plan,
                   const std::vector<CopyRun>& runs, cudaStream_t stream) {
  const int64_t vecs = plan.block_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t chunks = std::min<int64_t>(kMaxChunksPerBlock, (vecs + kThreads - 1) / kThreads);
  PairBatch batch;
  int n = 0;
  auto flush = [&] {
    if (n == 0) return;
    dim3 grid(static_cast<unsigned>(std::max<int64_t>(chunks, 1)), static_cast<unsigned>(n));
    copy_blocks_kernel<Vec><<<grid, kThreads, 0, stream>>>(
        src, dst, plan.src_stride_bytes, plan.dst_stride_bytes, vecs, batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    n = 0;
  };
  for (const CopyRun& run : runs) {
    for (int64_t b = 0; b < run.num_blocks; ++b) {
      batch.src[n] = static_cast<int32_t>(run.src_block + b);
      batch.dst[n] = static_cast<int32_t>(run.dst_block + b);
      if (++n == kPairsPerLaunch) flush();
    }
  }
  flush();
}

// Returns false when the kernel cannot address one side (pageable host memory)
// or block indices exceed int32.
bool try_kernel(const at::Tensor& src, const at::Tensor& dst, const CopyBlocksPlan& plan,
                cudaStream_t stream) {
  if (src.size(0) > INT32_MAX || dst.size(0) > INT32_MAX) return false;
  const char* s = kernel_address(src);
  char* d = const_cast<char*>(kernel_address(dst));
  if (s == nullptr || d == nullptr) return false;
  const int w = vector_bytes({reinterpret_cast<uint64_t>(s), reinterpret_cast<uint64_t>(d),
                              static_cast<uint64_t>(plan.src_stride_bytes),
                              static_cast<uint64_t>(plan.dst_stride_bytes),
                              static_cast<uint64_t>(plan.block_bytes)});
  switch (w) {
    case 16: launch_kernel<uint4>(s, d, plan, plan.runs, stream); break;
    case 8: launch_kernel<uint2>(s, d, plan, plan.runs, stream); break;
    case 4: launch_kernel<uint32_t>(s, d, plan, plan.runs, stream); break;
    case 2: launch_kernel<uint16_t>(s, d, plan, plan.runs, stream); break;
    default: launch_kernel<uint8_t>(s, d, plan, plan.runs, stream); break;
  }
  return true;
}

// A per-thread, per-device side stream and two events used to run the batch API
// when the current stream is the legacy default stream.
struct Bridge {
  bool ready = false;
  cudaStream_t side = nullptr;
  cudaEvent_t before = nullptr;
  cudaEvent_t after = nullptr;
};

Bridge& bridge_for(c10::DeviceIndex device) {
  thread_local std::vector<Bridge> bridges;
  if (bridges.size() <= static_cast<size_t>(device)) bridges.resize(device + 1);
  Bridge& b = bridges[device];
  if (!b.ready) {
    b.side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device).stream();
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&b.before, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&b.after, cudaEventDisableTiming));
    b.ready = true;
  }
  return b;
}

std::atomic<bool> g_batch_unsupported{false};

void memcpy_loop(const std::vector<void*>& dsts, const std::vector<const void*>& srcs,
                 const std::vector<size_t>& sizes, cudaStream_t stream) {
  for (size_t i = 0; i < dsts.size(); ++i) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream));
  }
}

// True when the batch was submitted; false when the runtime/driver lacks it.
bool memcpy_batch(const std::vector<void*>& dsts, const std::vector<const void*>& srcs,
                  const std::vector<size_t>& sizes, cudaStream_t stream,
                  c10::DeviceIndex device) {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
  if (g_batch_unsupported.load(std::memory_order_relaxed)) return false;
  cudaStream_t run_on = stream;
  Bridge* bridge = nullptr;
  if (stream == nullptr || stream == cudaStreamLegacy) {
    bridge = &bridge_for(device);
    C10_CUDA_CHECK(cudaEventRecord(bridge->before, stream));
    C10_CUDA_CHECK(cudaStreamWaitEvent(bridge->side, bridge->before, 0));
    run_on = bridge->side;
  }
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t attr_index = 0;
#if CUDART_VERSION >= 13000
  cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(),
                                         &attr, &attr_index, 1, run_on);
#else
  size_t fail_index = 0;
  cudaError_t err = cudaMemcpyBatchAsync(
      const_cast<void**>(dsts.data()), const_cast<void**>(srcs.data()),
      const_cast<size_t*>(sizes.data()), dsts.size(), &attr, &attr_index, 1, &fail_index,
      run_on);
#endif
  if (err == cudaErrorNotSupported || err == cudaErrorCallRequiresNewerDriver) {
    (void)cudaGetLastError();
    g_batch_unsupported.store(true, std::memory_order_relaxed);
    run_on = stream;  // the loop below runs on the caller's stream directly
    if (bridge != nullptr) {
      // Keep the bridge balanced: nothing was queued on the side stream.
      C10_CUDA_CHECK(cudaEventRecord(bridge->after, bridge->side));
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream, bridge->after, 0));
    }
    return false;
  }
  C10_CUDA_CHECK(err);
  if (bridge != nullptr) {
    C10_CUDA_CHECK(cudaEventRecord(bridge->after, bridge->side));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, bridge->after, 0));
  }
  return true;
#else
  (void)dsts; (void)srcs; (void)sizes; (void)stream; (void)device;
  return false;
#endif
}

void copy_blocks_cuda(const at::Tensor& src, const at::Tensor& dst,
                      const at::Tensor& block_mapping) {
  if (src.is_cuda() && dst.is_cuda()) {
    check_same_device(kOp, "src", src, "dst", dst);
  } else {
    TORCH_CHECK_VALUE((src.is_cuda() || src.is_cpu()) && (dst.is_cuda() || dst.is_cpu()), kOp,
                      ": `src` and `dst` must be CUDA or CPU tensors; got ", src.device(),
                      " and ", dst.device());
  }
  const CopyBlocksPlan plan = plan_copy_blocks(kOp, src, dst, block_mapping);
  if (plan.runs.empty()) return;

  const c10::Device device = dst.is_cuda() ? dst.device() : src.device();
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  const Path path = forced_path();
  const bool device_only = src.is_cuda() && dst.is_cuda();
  bool use_kernel = false;
  if (path == Path::kKernel) {
    use_kernel = true;
  } else if (path == Path::kAuto && plan.runs.size() > 1) {
    use_kernel = device_only ? plan.block_bytes <= kKernelMaxBlockBytesD2D
                             : plan.block_bytes <= host_kernel_max_bytes();
  }
  if (use_kernel && try_kernel(src, dst, plan, stream)) return;

  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  dsts.reserve(plan.runs.size());
  srcs.reserve(plan.runs.size());
  sizes.reserve(plan.runs.size());
  for (const CopyRun& run : plan.runs) {
    dsts.push_back(plan.dst_block_ptr(dst, run.dst_block));
    srcs.push_back(plan.src_block_ptr(src, run.src_block));
    sizes.push_back(static_cast<size_t>(run.num_blocks * plan.block_bytes));
  }
  const bool try_batch = path == Path::kBatch || (path != Path::kLoop && dsts.size() > 1);
  if (try_batch && memcpy_batch(dsts, srcs, sizes, stream, device.index())) return;
  memcpy_loop(dsts, srcs, sizes, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CUDA, m) {
  m.impl("copy_blocks_", &copy_blocks_cuda);
}

}  // namespace kvcompact

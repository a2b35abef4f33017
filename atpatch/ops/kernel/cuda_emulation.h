// A CPU emulation of the small part of CUDA that cuda_kernel.cu and cuda_selftest.cu use, so
// that the kernels' own source runs on a machine without a GPU (tests/test_kernel_cuda_build.py):
// a warp's 32 threads run together on 32 host threads (warps one after another), and warp
// shuffles meet at a barrier. Slow, and only as good as its model of CUDA:
// it checks indexing, lane and shuffle logic and the arithmetic, not timing or memory
// ordering. Built with g++ -DATPATCH_CUDA_EMULATION -x c++ (C++20), CUDA's headers on the path
// for __half and the runtime's types; no CUDA library is linked.
#pragma once

#include <cuda_fp16.h>  // __half and its host conversions; also CUDA's runtime types

#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace atpatch_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index thread_idx, block_idx;
inline Index block_dim, grid_dim;

// One warp's meeting point for shuffles: a barrier per participation mask.
struct Warp {
  std::mutex mutex;
  std::map<unsigned, std::unique_ptr<std::barrier<>>> barriers;
  double slots[32] = {};
  std::barrier<>& barrier(unsigned mask) {
    std::lock_guard<std::mutex> lock(mutex);
    auto& b = barriers[mask];
    if (!b) b = std::make_unique<std::barrier<>>(__builtin_popcount(mask));
    return *b;
  }
};
inline thread_local Warp* current_warp = nullptr;

template <typename V>
V exchange(unsigned mask, V value, int source) {
  Warp& w = *current_warp;
  const int lane = static_cast<int>(thread_idx.x % 32);
  if (!(mask >> lane & 1u)) std::abort();  // a thread outside its own mask: a bug in the kernel
  std::barrier<>& b = w.barrier(mask);
  w.slots[lane] = static_cast<double>(value);
  b.arrive_and_wait();
  if (!(mask >> source & 1u)) std::abort();  // reading a lane that is not taking part
  const V result = static_cast<V>(w.slots[source]);
  b.arrive_and_wait();
  return result;
}

// 32 worker threads, one per lane, reused for every warp of every launch.
class Lanes {
 public:
  Lanes() {
    for (unsigned lane = 0; lane < 32; ++lane) {
      workers_.emplace_back([this, lane] {
        for (;;) {
          start_.arrive_and_wait();
          if (stop_) return;
          job_(lane);
          done_.arrive_and_wait();
        }
      });
    }
  }
  ~Lanes() {
    stop_ = true;
    start_.arrive_and_wait();
    for (auto& t : workers_) t.join();
  }
  void run(const std::function<void(unsigned)>& job) {
    job_ = job;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }

 private:
  std::vector<std::thread> workers_;
  std::barrier<> start_{33}, done_{33};
  std::function<void(unsigned)> job_;
  bool stop_ = false;
};

template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned block, Kernel kernel, Args... args) {
  static Lanes lanes;
  if (block % 32 != 0) std::abort();
  grid_dim = {grid, 1, 1};
  block_dim = {block, 1, 1};
  for (unsigned g = 0; g < grid; ++g) {
    for (unsigned w = 0; w < block / 32; ++w) {
      Warp warp;
      lanes.run([&](unsigned lane) {
        block_idx = {g, 0, 0};
        thread_idx = {w * 32 + lane, 0, 0};
        current_warp = &warp;
        kernel(args...);
      });
    }
  }
}

// Memory: plain host memory; streams and events are timestamps.
inline cudaError_t malloc_any(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

}  // namespace atpatch_emulation

#define threadIdx (atpatch_emulation::thread_idx)
#define blockIdx (atpatch_emulation::block_idx)
#define blockDim (atpatch_emulation::block_dim)
#define gridDim (atpatch_emulation::grid_dim)

// Device intrinsics: IEEE round-to-nearest operations (compile with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
template <typename V>
inline V __ldg(const V* p) { return *p; }
template <typename V>
inline V __shfl_sync(unsigned mask, V value, int source, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  return atpatch_emulation::exchange(mask, value, (lane & ~(width - 1)) + (source % width));
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  return atpatch_emulation::exchange(mask, value, (lane & ~(width - 1)) + ((lane ^ lane_mask) % width));
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

// The runtime API calls the two files make, renamed onto emulations.
namespace atpatch_emulation {
inline cudaError_t get_last_error() { return cudaSuccess; }
inline cudaError_t get_device_count(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t set_device(int) { return cudaSuccess; }
inline cudaError_t pointer_attributes(cudaPointerAttributes* a, const void*) {
  *a = cudaPointerAttributes{};
  a->type = cudaMemoryTypeHost;
  return cudaSuccess;
}
inline cudaError_t malloc_async(void** p, size_t bytes, cudaStream_t) {
  // Fill with a pattern so that a read of workspace the kernels never wrote shows.
  cudaError_t e = malloc_any(p, bytes);
  if (e == cudaSuccess) std::memset(*p, 0x7f, bytes);
  return e;
}
inline cudaError_t free_async(void* p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t memset_async(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
template <typename V>
cudaError_t device_malloc(V** p, size_t bytes) {
  return malloc_any(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t device_free(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t memcpy_any(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t memcpy_async(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t memset_any(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t stream_create(cudaStream_t* s, unsigned) {
  *s = nullptr;
  return cudaSuccess;
}
inline cudaError_t stream_any(cudaStream_t) { return cudaSuccess; }
inline cudaError_t event_create(cudaEvent_t* e) {
  *e = reinterpret_cast<cudaEvent_t>(new std::chrono::steady_clock::time_point());
  return cudaSuccess;
}
inline cudaError_t event_destroy(cudaEvent_t e) {
  delete reinterpret_cast<std::chrono::steady_clock::time_point*>(e);
  return cudaSuccess;
}
inline cudaError_t event_record(cudaEvent_t e, cudaStream_t) {
  *reinterpret_cast<std::chrono::steady_clock::time_point*>(e) = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t event_synchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t event_elapsed(float* ms, cudaEvent_t a, cudaEvent_t b) {
  const auto* t0 = reinterpret_cast<std::chrono::steady_clock::time_point*>(a);
  const auto* t1 = reinterpret_cast<std::chrono::steady_clock::time_point*>(b);
  *ms = std::chrono::duration<float, std::milli>(*t1 - *t0).count();
  return cudaSuccess;
}
inline cudaError_t device_properties(cudaDeviceProp* p, int) {
  *p = cudaDeviceProp{};
  std::strcpy(p->name, "CPU emulation of CUDA (cuda_emulation.h)");
  return cudaSuccess;
}
inline cudaError_t driver_version(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline const char* error_name(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
}  // namespace atpatch_emulation

#define cudaGetLastError atpatch_emulation::get_last_error
#define cudaGetDeviceCount atpatch_emulation::get_device_count
#define cudaGetDevice atpatch_emulation::get_device
#define cudaSetDevice atpatch_emulation::set_device
#define cudaPointerGetAttributes atpatch_emulation::pointer_attributes
#define cudaMallocAsync atpatch_emulation::malloc_async
#define cudaFreeAsync atpatch_emulation::free_async
#define cudaMemsetAsync atpatch_emulation::memset_async
#define cudaMalloc atpatch_emulation::device_malloc
#define cudaFree atpatch_emulation::device_free
#define cudaMemcpy atpatch_emulation::memcpy_any
#define cudaMemcpyAsync atpatch_emulation::memcpy_async
#define cudaMemset atpatch_emulation::memset_any
#define cudaStreamCreateWithFlags atpatch_emulation::stream_create
#define cudaStreamSynchronize atpatch_emulation::stream_any
#define cudaStreamDestroy atpatch_emulation::stream_any
#define cudaEventCreate atpatch_emulation::event_create
#define cudaEventDestroy atpatch_emulation::event_destroy
#define cudaEventRecord atpatch_emulation::event_record
#define cudaEventSynchronize atpatch_emulation::event_synchronize
#define cudaEventElapsedTime atpatch_emulation::event_elapsed
#define cudaGetDeviceProperties atpatch_emulation::device_properties
#define cudaDriverGetVersion atpatch_emulation::driver_version
#define cudaGetErrorName atpatch_emulation::error_name
#define cudaGetErrorString atpatch_emulation::error_name

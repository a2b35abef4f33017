// What the CUDA kernels (cuda_kernel.cu, cuda_fused.cu) share: the block size, a grid for a number
// of threads, the launch (on the device, or on the CPU emulation), and CUDA errors as one line.
#pragma once

#if defined(ATPATCH_CUDA_EMULATION)
#include "cuda_emulation.h"  // the same source on the CPU, for tests without a GPU
#else
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <string>

namespace atpatch {
namespace cuda {

constexpr int kThreads = 256;

#if defined(ATPATCH_CUDA_EMULATION)
#define ATPATCH_LAUNCH(kernel, grid, stream, ...) \
  atpatch_emulation::launch(grid, ::atpatch::cuda::kThreads, kernel, __VA_ARGS__)
#else
#define ATPATCH_LAUNCH(kernel, grid, stream, ...) kernel<<<grid, ::atpatch::cuda::kThreads, 0, stream>>>(__VA_ARGS__)
#endif

// Enough blocks to fill the device several times over; the kernels loop over the rest.
inline unsigned grid_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t{1} << 20));
}

inline std::string error_text(cudaError_t err, const char* what) {
  std::string text = std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice) {
    text += "; this kernel was built with CUDA runtime " + std::to_string(CUDART_VERSION / 1000) + "." +
            std::to_string(CUDART_VERSION % 1000 / 10) + ", which needs a matching NVIDIA driver";
  }
  return text;
}

}  // namespace cuda
}  // namespace atpatch

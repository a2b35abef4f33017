// AtPatchAttention on a CUDA device: see cuda_fused.h.
#include "cuda_fused.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "cuda_common.h"

namespace atpatch {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

std::string fused_error(cudaError_t err, const char* what) {
  return "AtPatchAttention " + error_text(err, what);
}

// One warp per map row (b, h, q), rows strided over the grid; lane l holds keys l, l + 32, ...
// A row whose every score is -inf (or NaN) is NaN, as Softmax gives it.
__global__ void map_kernel(FusedProblem f, float* map) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t rows = f.batch * f.heads * f.q_len;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; row < rows;
       row += warps) {
    const int64_t q = row % f.q_len, bh = row / f.q_len, h = bh % f.heads, b = bh / f.heads;
    const float* query = f.query.data + b * f.query.batch_stride + h * f.query.head_stride + q * f.depth;
    const float* key_t = f.key_t.data + b * f.key_t.batch_stride + h * f.key_t.head_stride;
    const float* bias = f.bias + b * f.bias_strides[0] + h * f.bias_strides[1] + q * f.bias_strides[2];
    float* out = map + row * f.k_len;
    float most = -INFINITY;
    for (int64_t k = lane; k < f.k_len; k += kWarp) {
      float acc = 0.0f;
      for (int64_t d = 0; d < f.depth; ++d) acc = __fadd_rn(acc, __fmul_rn(query[d], key_t[d * f.k_len + k]));
      const float v = __fadd_rn(__fmul_rn(acc, f.scale), bias[k * f.bias_strides[3]]);
      out[k] = v;
      most = v > most ? v : most;
    }
    // xor butterflies: every lane ends with the same value (each step adds a pair in both orders,
    // and float addition and max are commutative).
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, most, offset);
      most = other > most ? other : most;
    }
    if (most == -INFINITY) {
      for (int64_t k = lane; k < f.k_len; k += kWarp) out[k] = NAN;
      continue;
    }
    float sum = 0.0f;
    for (int64_t k = lane; k < f.k_len; k += kWarp) {
      const float e = expf(__fsub_rn(out[k], most));
      out[k] = e;
      sum = __fadd_rn(sum, e);
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum = __fadd_rn(sum, __shfl_xor_sync(kFullMask, sum, offset));
    for (int64_t k = lane; k < f.k_len; k += kWarp) out[k] = __fdiv_rn(out[k], sum);
  }
}

// One thread per output entry (b, h, q, e): the patched row times the values' column e, keys in order.
__global__ void values_kernel(FusedProblem f, const float* map) {
  const int64_t entries = f.batch * f.heads * f.q_len * f.width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < entries; i += stride) {
    const int64_t e = i % f.width, row = i / f.width, bh = row / f.q_len, h = bh % f.heads, b = bh / f.heads;
    const float* probs = map + row * f.k_len;
    const float* value = f.value.data + b * f.value.batch_stride + h * f.value.head_stride + e;
    float acc = 0.0f;
    for (int64_t k = 0; k < f.k_len; ++k) acc = __fadd_rn(acc, __fmul_rn(probs[k], value[k * f.width]));
    f.output[i] = acc;
  }
}

}  // namespace

std::string run_fused(const FusedProblem& f, void* raw_stream) {
  const auto stream = static_cast<cudaStream_t>(raw_stream);
  const int64_t rows = f.batch * f.heads * f.q_len, entries = rows * f.k_len, outputs = rows * f.width;
  Problem p = f.patch;
  p.dtype = Dtype::kFloat32;
  p.batch = f.batch;
  p.heads = f.heads;
  p.q_len = f.q_len;
  p.k_len = f.k_len;
  (void)cudaGetLastError();  // a stale error from another library must not be reported as ours
  if (entries == 0) {  // no map: weights over no keys sum to 0; run() writes the flags and scores
    if (outputs > 0) {
      const cudaError_t err = cudaMemsetAsync(f.output, 0, static_cast<size_t>(outputs) * sizeof(float), stream);
      if (err != cudaSuccess) return fused_error(err, "clearing the output");
    }
    p.heads = 0;
    p.in = p.out = nullptr;
    return run(p, raw_stream);
  }
  void* map = nullptr;
  if (cudaError_t err = cudaMallocAsync(&map, static_cast<size_t>(entries) * sizeof(float), stream)) {
    return fused_error(err, "allocating the map");
  }
  auto* probs = static_cast<float*>(map);
  std::string error;
  ATPATCH_LAUNCH(map_kernel, grid_for(rows * kWarp), stream, f, probs);
  if (cudaError_t err = cudaGetLastError()) error = fused_error(err, "forming the map");
  if (error.empty()) {
    p.in = p.out = probs;  // in place: the map is the kernel's own
    error = run(p, raw_stream);
  }
  if (error.empty() && outputs > 0) {
    ATPATCH_LAUNCH(values_kernel, grid_for(outputs), stream, f, static_cast<const float*>(probs));
    if (cudaError_t err = cudaGetLastError()) error = fused_error(err, "weighing the values");
  }
  if (cudaError_t err = cudaFreeAsync(map, stream); err != cudaSuccess && error.empty()) {
    error = fused_error(err, "freeing the map");
  }
  return error;
}

}  // namespace cuda
}  // namespace atpatch

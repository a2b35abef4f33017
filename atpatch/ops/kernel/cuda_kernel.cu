// AtPatch on a CUDA device: the same three phases as core.h, as four kernels on one stream.
//   1. row_stats:  16 threads per row        -> whether the row counts; n_q, the row maximum and
//                                               the sum of squares (core.cc's row_stats lanes)
//   2. columns:    one thread per (b, h, j)  -> per-head mass, peak, top (counted rows in order),
//                                               and (op v2) self, opeak, ofocus from row j's own
//   3. scores:     one thread per (b, j)     -> flags[b, j], P = flags OR forced, P's size per item
//   4. patch:      16 threads per row        -> the patched row, or nothing when unchanged
// Every float operation is core.cc's, in core.cc's order, with explicit round-to-nearest
// intrinsics (__fadd_rn, ...) so that nvcc cannot fuse a multiply-add: the result equals the
// CPU kernel's bit for bit (see cuda_kernel.h).
#include "cuda_kernel.h"

#if !defined(ATPATCH_CUDA_EMULATION)
#include <cuda_fp16.h>
#endif

#include <algorithm>
#include <cmath>
#include <string>

#include "core.h"
#include "cuda_common.h"

namespace atpatch {
namespace cuda {
namespace {

// core.cc's lane count: row_stats and patch_row sum a row in kLanes interleaved lanes, then
// combine the lanes in double. The row_stats and patch kernels give each lane its own thread.
constexpr int kLanes = 16;

// Plain loads (no __ldg): the patch kernel may run in place, where the map is written.
__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
// Round to nearest even, as Ort::Float16_t(float) in the CPU kernel.
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// n_q of a row that phase 1 does not count (a padding query, core.h's counts_row): the
// columns kernel skips such rows, as core.cc does.
constexpr float kSkippedRow = -1.0f;

// Phase 1a: whether the row counts (one entry read, by every lane alike), then core.cc's
// row_stats, one row per 16-thread group, thread l holding core.cc's lane l (entries j = l,
// l + 16, ...; the tail after the last full group of 16 goes to lane 0): n_q and the row maximum
// (initial 0), order-independent (counts of small integers; a max where NaN never wins), and the
// sum of squares, whose lanes are combined in double in lane order, as core.cc does.
template <typename T>
__global__ void row_stats_kernel(const T* __restrict__ in, int64_t rows, int64_t q_len, int64_t k_len,
                                 bool count_every_row, float* __restrict__ support, float* __restrict__ row_max,
                                 float* __restrict__ row_squares) {
  const int lane = threadIdx.x % kLanes;
  const unsigned mask = ((threadIdx.x % 32) < kLanes) ? 0x0000ffffu : 0xffff0000u;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (blockDim.x / kLanes);
  const int64_t full = k_len / kLanes * kLanes;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes; r < rows; r += groups) {
    const T* row = in + r * k_len;
    const int64_t own = k_len - q_len + r % q_len;  // the row's key position (core.h's own_key)
    if (!count_every_row && own >= 0 && !(load(row, own) > 0.0f)) {
      if (lane == 0) {
        support[r] = kSkippedRow;
        row_max[r] = 0.0f;
        row_squares[r] = 0.0f;
      }
      continue;  // the same for the whole group: r and `own` are
    }
    float count = 0.0f, m = 0.0f, squares = 0.0f;
    auto add = [&](int64_t j) {
      const float v = load(row, j);
      count = __fadd_rn(count, v > 0.0f ? 1.0f : 0.0f);
      m = v > m ? v : m;
      squares = __fadd_rn(squares, __fmul_rn(v, v));
    };
    for (int64_t j = lane; j < full; j += kLanes) add(j);
    if (lane == 0) {
      for (int64_t j = full; j < k_len; ++j) add(j);
    }
    float n = 0.0f, mx = 0.0f;
    double sum = 0.0;
    for (int l = 0; l < kLanes; ++l) {
      n = __fadd_rn(n, __shfl_sync(mask, count, l, kLanes));
      const float other = __shfl_sync(mask, m, l, kLanes);
      mx = other > mx ? other : mx;
      sum = __dadd_rn(sum, static_cast<double>(__shfl_sync(mask, squares, l, kLanes)));
    }
    if (lane == 0) {
      support[r] = n;
      row_max[r] = mx;
      row_squares[r] = __double2float_rn(sum);
    }
  }
}

// Phase 1b: one thread per (block, column), counted rows in order (core.cc's accumulate_row and
// finish_columns), then (op v2, `own_features`) the column's own row's features (core.h's
// own_row): column j's own row is o = j - (k_len - q_len), when 0 <= o and that row is counted.
// Features go to [batch, features_per_head * heads, k_len]: feature f of head h at f * heads + h,
// each row of columns contiguous.
template <typename T>
__global__ void columns_kernel(const T* __restrict__ in, int64_t heads, int64_t q_len, int64_t k_len,
                               int64_t total, bool own_features, const float* __restrict__ support,
                               const float* __restrict__ row_max, const float* __restrict__ row_squares,
                               float* __restrict__ features) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int features_per_head = own_features ? kFeaturesPerHead : kFeaturesPerHeadV1;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t block = t / k_len, j = t % k_len;
    const T* column = in + block * q_len * k_len + j;
    const float* n = support + block * q_len;
    const float* mx = row_max + block * q_len;
    float mass = 0.0f, peak = 0.0f, top = 0.0f, rows = 0.0f;
    for (int64_t q = 0; q < q_len; ++q) {
      const float n_q = __ldg(n + q);
      if (n_q == kSkippedRow) continue;
      const float v = load(column, q * k_len);
      const float valid = v > 0.0f ? 1.0f : 0.0f;
      mass = __fadd_rn(mass, __fmul_rn(v, n_q));
      peak = v > peak ? v : peak;
      top = __fadd_rn(top, v >= __ldg(mx + q) ? valid : 0.0f);
      rows = __fadd_rn(rows, valid);
    }
    const float divisor = rows > 1.0f ? rows : 1.0f;
    const int64_t b = block / heads, h = block % heads;
    float* out = features + b * features_per_head * heads * k_len + h * k_len + j;
    out[0] = __fdiv_rn(mass, divisor);
    out[heads * k_len] = peak;
    out[2 * heads * k_len] = __fdiv_rn(top, divisor);
    if (own_features) {
      float self = 0.0f, opeak = 0.0f, ofocus = 0.0f;
      const int64_t o = j - (k_len - q_len);  // < q_len, as j < k_len
      if (o >= 0) {
        const float n_o = __ldg(n + o);
        if (n_o != kSkippedRow) {
          self = __fmul_rn(load(column, o * k_len), n_o);
          opeak = __fmul_rn(__ldg(mx + o), n_o);
          ofocus = __fmul_rn(__ldg(row_squares + block * q_len + o), n_o);
        }
      }
      out[3 * heads * k_len] = self;
      out[4 * heads * k_len] = opeak;
      out[5 * heads * k_len] = ofocus;
    }
  }
}

// Phase 2: core.cc's score_columns for one column of one item; dots in double. Writes the
// `flags` and `scores` outputs (when wanted) and P = flags OR forced as the float mask the patch reads.
__global__ void scores_kernel(const float* __restrict__ features, int64_t batch, int64_t heads, int64_t k_len,
                              int features_per_head, const float* __restrict__ w1, const float* __restrict__ b1,
                              const float* __restrict__ w2, const float* __restrict__ b2, int64_t hidden,
                              float threshold, const uint8_t* __restrict__ forced, int64_t forced_batch_stride,
                              int64_t forced_key_stride, uint8_t* __restrict__ flags_out,
                              float* __restrict__ scores_out, float* __restrict__ patch,
                              unsigned long long* __restrict__ counts) {
  const int64_t total = batch * k_len;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t rows = features_per_head * heads;  // w1's rows
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t b = t / k_len, j = t % k_len;
    const float* f = features + b * rows * k_len + j;
    bool attended = false;  // some head's peak > 0: some counted row has the column unmasked
    for (int64_t h = 0; h < heads; ++h) attended |= f[(heads + h) * k_len] > 0.0f;
    bool flag = false;
    float s = -INFINITY;  // the `scores` output of a column no counted row attends to
    if (attended) {
      double score = 0.0;
      for (int64_t i = 0; i < hidden; ++i) {
        double dot = 0.0;
        for (int64_t r = 0; r < rows; ++r) {  // r = f * heads + h: core.cc's loop order
          dot = __dadd_rn(dot, __dmul_rn(static_cast<double>(f[r * k_len]), static_cast<double>(__ldg(w1 + r * hidden + i))));
        }
        const float z = __fadd_rn(__double2float_rn(dot), __ldg(b1 + i));
        const float h = z > 0.0f ? z : 0.0f;
        score = __dadd_rn(score, __dmul_rn(static_cast<double>(h), static_cast<double>(__ldg(w2 + i))));
      }
      s = __fadd_rn(__double2float_rn(score), __ldg(b2));
      flag = s > threshold;
    }
    if (scores_out != nullptr) scores_out[t] = s;
    const bool in_p = flag || (forced != nullptr && forced[b * forced_batch_stride + j * forced_key_stride] != 0);
    if (flags_out != nullptr) flags_out[t] = flag ? 1 : 0;
    patch[t] = in_p ? 1.0f : 0.0f;
    if (in_p) atomicAdd(counts + b, 1ull);
  }
}

// The scores of an empty map: every column unattended.
__global__ void fill_kernel(float* __restrict__ x, int64_t n, float value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n; t += stride) x[t] = value;
}

// Phase 3: core.cc's patch_row, one row per 16-thread group, thread l holding core.cc's lane l
// (entries j = l, l + 16, ...; the tail after the last full group of 16 goes to lane 0).
template <typename T>
__global__ void patch_kernel(const T* in, T* out, int64_t rows, int64_t rows_per_item, int64_t k_len,
                             const float* __restrict__ all_patch, const unsigned long long* __restrict__ counts) {
  const int lane = threadIdx.x % kLanes;
  const unsigned mask = ((threadIdx.x % 32) < kLanes) ? 0x0000ffffu : 0xffff0000u;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (blockDim.x / kLanes);
  const int64_t full = k_len / kLanes * kLanes;
  constexpr float kInf = INFINITY;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes; r < rows; r += groups) {
    const T* row = in + r * k_len;
    T* row_out = out + r * k_len;
    const int64_t b = r / rows_per_item;
    const float* in_p = all_patch + b * k_len;  // P: flags OR forced
    bool changed = false;
    if (counts[b] != 0) {
      float hits = 0.0f, kept = 0.0f, kept_sum = 0.0f;
      auto add = [&](int64_t j) {
        const float v = load(row, j);
        const float valid = v > 0.0f ? 1.0f : 0.0f;
        const float hit = __fmul_rn(valid, in_p[j]);
        const float keep = __fsub_rn(valid, hit);
        hits = __fadd_rn(hits, hit);
        kept = __fadd_rn(kept, keep);
        kept_sum = __fadd_rn(kept_sum, keep > 0.0f ? v : 0.0f);
      };
      for (int64_t j = lane; j < full; j += kLanes) add(j);
      if (lane == 0) {
        for (int64_t j = full; j < k_len; ++j) add(j);
      }
      // Counts are small integers (exact in any order); the sum is combined lane by lane in
      // double, in lane order, as core.cc does.
      float n_hits = 0.0f, n_kept = 0.0f;
      double sum = 0.0;
      for (int l = 0; l < kLanes; ++l) {
        n_hits = __fadd_rn(n_hits, __shfl_sync(mask, hits, l, kLanes));
        n_kept = __fadd_rn(n_kept, __shfl_sync(mask, kept, l, kLanes));
        sum = __dadd_rn(sum, static_cast<double>(__shfl_sync(mask, kept_sum, l, kLanes)));
      }
      if (n_hits != 0.0f && n_kept != 0.0f) {
        changed = true;
        float low = kInf;
        for (int64_t j = lane; j < k_len; j += kLanes) {
          const float v = load(row, j);
          const float unmasked = v > 0.0f ? v : kInf;
          const float candidate = in_p[j] != 0.0f ? kInf : unmasked;
          low = candidate < low ? candidate : low;
        }
        for (int offset = kLanes / 2; offset > 0; offset /= 2) {
          const float other = __shfl_xor_sync(mask, low, offset, kLanes);
          low = other < low ? other : low;
        }
        const float benign = low;
        const float total = __fadd_rn(__double2float_rn(sum), __fmul_rn(n_hits, benign));
        for (int64_t j = lane; j < k_len; j += kLanes) {
          const float v = load(row, j);
          const float numerator = in_p[j] != 0.0f ? benign : v;
          store(row_out, j, __fdiv_rn(v > 0.0f ? numerator : 0.0f, total));
        }
      }
    }
    if (!changed && row_out != row) {
      // Unchanged rows are the input, bit for bit.
      for (int64_t j = lane; j < k_len; j += kLanes) row_out[j] = row[j];
    }
  }
}

template <typename T>
std::string run_typed(const Problem& p, cudaStream_t stream) {
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  const int64_t blocks = p.batch * p.heads, rows = blocks * p.q_len;
  const bool empty = rows == 0 || p.k_len == 0;
  if (empty && ((p.flags == nullptr && p.scores == nullptr) || p.batch * p.k_len == 0)) return "";

  // The CUDA EP may run this thread on another device than the tensors': follow the data.
  cudaPointerAttributes attributes{};
  const void* data = !empty ? p.in : p.flags != nullptr ? static_cast<const void*>(p.flags) : p.scores;
  if (cudaPointerGetAttributes(&attributes, data) == cudaSuccess && attributes.type == cudaMemoryTypeDevice) {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != attributes.device) {
      if (cudaError_t err = cudaSetDevice(attributes.device)) return error_text(err, "selecting the tensors' device");
    }
  }
  (void)cudaGetLastError();  // a stale error from another library must not be reported as ours
  if (empty) {  // no entries (no heads or no queries): no column is attended, none flagged
    if (p.flags != nullptr) {
      const cudaError_t err = cudaMemsetAsync(p.flags, 0, static_cast<size_t>(p.batch * p.k_len), stream);
      if (err != cudaSuccess) return error_text(err, "clearing the flags");
    }
    if (p.scores != nullptr) {
      ATPATCH_LAUNCH(fill_kernel, grid_for(p.batch * p.k_len), stream, p.scores, p.batch * p.k_len, -INFINITY);
      if (cudaError_t err = cudaGetLastError()) return error_text(err, "filling the scores");
    }
    return "";
  }

  // Workspace: n_q, row max and sum of squares per row, features per item, P per item, P's size
  // per item. Op v1 has the first three features only.
  const int features_per_head = p.count_every_row ? kFeaturesPerHeadV1 : kFeaturesPerHead;
  const int64_t feature_floats = p.batch * features_per_head * p.heads * p.k_len;
  const size_t float_count = static_cast<size_t>(3 * rows + feature_floats + p.batch * p.k_len);
  const size_t bytes = float_count * sizeof(float) + static_cast<size_t>(p.batch) * sizeof(unsigned long long);
  void* workspace = nullptr;
  if (cudaError_t err = cudaMallocAsync(&workspace, bytes, stream)) {
    return error_text(err, "allocating the kernel's workspace");
  }
  auto* counts = static_cast<unsigned long long*>(workspace);  // first: 8-byte aligned
  float* support = reinterpret_cast<float*>(counts + p.batch);
  float* row_max = support + rows;
  float* row_squares = row_max + rows;
  float* features = row_squares + rows;
  float* patch = features + feature_floats;

  std::string error;
  cudaError_t err = cudaMemsetAsync(counts, 0, static_cast<size_t>(p.batch) * sizeof(unsigned long long), stream);
  if (err != cudaSuccess) error = error_text(err, "clearing the flag counts");
  if (error.empty()) {
    ATPATCH_LAUNCH(row_stats_kernel<T>, grid_for(rows * kLanes), stream, in, rows, p.q_len, p.k_len,
                   p.count_every_row, support, row_max, row_squares);
    ATPATCH_LAUNCH(columns_kernel<T>, grid_for(blocks * p.k_len), stream, in, p.heads, p.q_len, p.k_len,
                   blocks * p.k_len, !p.count_every_row, support, row_max, row_squares, features);
    ATPATCH_LAUNCH(scores_kernel, grid_for(p.batch * p.k_len), stream, features, p.batch, p.heads, p.k_len,
                   features_per_head, p.w1, p.b1, p.w2, p.b2, p.hidden, p.threshold, p.forced,
                   p.forced_batch_stride, p.forced_key_stride, p.flags, p.scores, patch, counts);
    ATPATCH_LAUNCH(patch_kernel<T>, grid_for(rows * kLanes), stream, in, out, rows, p.heads * p.q_len, p.k_len,
                   patch, counts);
    if ((err = cudaGetLastError()) != cudaSuccess) error = error_text(err, "launching the AtPatch kernels");
  }
  if (error.empty() && p.features_out != nullptr) {
    err = cudaMemcpyAsync(p.features_out, features, static_cast<size_t>(feature_floats) * sizeof(float),
                          cudaMemcpyDeviceToDevice, stream);
    if (err != cudaSuccess) error = error_text(err, "copying the features out");
  }
  if ((err = cudaFreeAsync(workspace, stream)) != cudaSuccess && error.empty()) {
    error = error_text(err, "freeing the kernel's workspace");
  }
  return error;
}

}  // namespace

std::string run(const Problem& problem, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return problem.dtype == Dtype::kFloat32 ? run_typed<float>(problem, s) : run_typed<__half>(problem, s);
}

}  // namespace cuda
}  // namespace atpatch

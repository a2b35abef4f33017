// The AtPatch kernel's three parallel phases over a map in memory (core.h says what each does),
// shared by the AtPatch op (custom_op.cc) and the fused AtPatchAttention op (fused_op.cc), whose
// map lives in its own workspace. Header-only: templates over the map's element type.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "core.h"

namespace atpatch::phases {

// Workspace floats per (batch, head) block and key column: 4 accumulators, 3 own-row features
// (op v2 only) and 1 row scratch.
constexpr int64_t kBlockFloats = 8;
constexpr int64_t kBlockFloatsV1 = 5;

template <typename T>
struct Element;
template <>
struct Element<float> {
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  static float one(float v) { return v; }
  static void from_float(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }
};
template <>
struct Element<Ort::Float16_t> {
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  static float one(Ort::Float16_t v) { return v.ToFloat(); }
  static void from_float(const float* src, int64_t n, Ort::Float16_t* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = Ort::Float16_t(src[i]);
  }
};

// Everything one Compute call shares with its parallel tasks (read-only except the
// per-block / per-item slices each task owns).
template <typename T>
struct Job {
  const T* in;
  T* out;
  int64_t batch, heads, q_len, k_len;
  bool count_every_row;  // op v1: also no own-row features (detector.features_per_head 3)
  bool as_float16;       // float32 values of a map the model declares float16: read them rounded to it
  atpatch::DetectorView detector;
  float* workspace;  // [batch*heads, block_floats(), k_len]
  float* patch;      // [batch, k_len], 1.0 = in P (flags OR forced)
  const uint8_t* forced;  // v2: see atpatch::Checked; nullptr for v1
  int64_t forced_batch_stride, forced_key_stride;
  uint8_t* flags;  // v2: the flags output [batch, k_len], or nullptr
  float* scores;   // v2: the scores output [batch, k_len], or nullptr
  std::vector<int64_t> patched;  // per batch item: columns in P
  std::vector<atpatch::HeadColumns> head_columns;  // per block, views into workspace

  int64_t block_floats() const { return count_every_row ? kBlockFloatsV1 : kBlockFloats; }
  atpatch::HeadColumns columns(int64_t block) const {
    float* base = workspace + block * block_floats() * k_len;
    float* const own = count_every_row ? nullptr : base + 4 * k_len;  // op v1: no own-row features
    return {base, base + k_len, base + 2 * k_len, base + 3 * k_len,
            own, own ? own + k_len : nullptr, own ? own + 2 * k_len : nullptr};
  }
  float* scratch(int64_t block) const { return workspace + ((block + 1) * block_floats() - 1) * k_len; }
  const T* block_in(int64_t block) const { return in + block * q_len * k_len; }
  // One entry as float32: as_float16, as the float16 value the model declares (round to nearest
  // even, so anything <= 2^-25 is 0: masked), as the function's patch reads it.
  float read(T v) const { return as_float16 ? rounded(Element<T>::one(v)) : Element<T>::one(v); }
  // A row as float32, in `dst`, each entry as read() reads it (the test is outside the loop, which
  // then vectorises).
  void load_row(const T* src, float* dst) const {
    if (as_float16) {
      for (int64_t j = 0; j < k_len; ++j) dst[j] = rounded(Element<T>::one(src[j]));
    } else {
      for (int64_t j = 0; j < k_len; ++j) dst[j] = Element<T>::one(src[j]);
    }
  }
  static float rounded(float v) { return Ort::Float16_t(v).ToFloat(); }
  // float32 rows are read in place unless they are to be rounded to float16.
  bool reads_in_place() const { return std::is_same_v<T, float> && !as_float16; }
  T* block_out(int64_t block) const { return out + block * q_len * k_len; }
};

// Phase 1: one (batch, head) block -> its column features, over the rows it counts.
template <typename T>
void features_task(void* data, size_t block_index) {
  const auto& job = *static_cast<const Job<T>*>(data);
  const auto block = static_cast<int64_t>(block_index);
  const atpatch::HeadColumns cols = job.columns(block);
  atpatch::clear_columns(cols, job.k_len);
  const T* rows = job.block_in(block);
  float* scratch = job.scratch(block);
  // Each counted row: its statistics, the own-row features it gives its column (op v2: a counted
  // row is a real one), then its sums into the columns. float32 rows go kRowGroup at a time
  // (the same results, faster); float16 ones, and float32 ones read as float16 (map_type), one
  // by one through scratch.
  const auto own_features = [&](int64_t q, const float* row, const atpatch::RowStats& stats) {
    const int64_t own = atpatch::own_key(q, job.q_len, job.k_len);
    if (!job.count_every_row && own >= 0) atpatch::own_row(row, own, stats, cols);
  };
  const auto one_row = [&](int64_t q, const float* row) {
    const atpatch::RowStats stats = atpatch::row_stats(row, job.k_len);
    own_features(q, row, stats);
    atpatch::accumulate_row(row, job.k_len, stats, cols);
  };
  const float* group[atpatch::kRowGroup];
  int64_t group_q[atpatch::kRowGroup];
  int grouped = 0;
  for (int64_t q = 0; q < job.q_len; ++q) {
    const T* src = rows + q * job.k_len;
    const auto entry = [&](int64_t j) { return job.read(src[j]); };
    if (!atpatch::counts_row(job.count_every_row, q, job.q_len, job.k_len, entry)) continue;  // a padding query
    if constexpr (std::is_same_v<T, float>) {
      if (job.reads_in_place()) {
        group[grouped] = src;
        group_q[grouped] = q;
        if (++grouped == atpatch::kRowGroup) {
          atpatch::RowStats stats[atpatch::kRowGroup];
          atpatch::row_stats_group(group, job.k_len, stats);
          for (int i = 0; i < atpatch::kRowGroup; ++i) own_features(group_q[i], group[i], stats[i]);
          atpatch::accumulate_rows(group, stats, cols, job.k_len);
          grouped = 0;
        }
        continue;
      }
    }
    job.load_row(src, scratch);
    one_row(q, scratch);
  }
  for (int i = 0; i < grouped; ++i) one_row(group_q[i], group[i]);  // float32 rows left over
  atpatch::finish_columns(cols, job.k_len);
}

// Phase 2: one batch item -> flags and P (its heads' blocks are contiguous).
template <typename T>
void score_task(void* data, size_t item) {
  auto& job = *static_cast<Job<T>*>(data);
  const auto b = static_cast<int64_t>(item);
  const atpatch::ColumnMasks masks{job.forced ? job.forced + b * job.forced_batch_stride : nullptr,
                                   job.forced_key_stride, job.flags ? job.flags + b * job.k_len : nullptr,
                                   job.patch + b * job.k_len, job.scores ? job.scores + b * job.k_len : nullptr};
  job.patched[b] = atpatch::score_columns(job.head_columns.data() + b * job.heads, job.heads, job.k_len,
                                          job.detector, masks);
}

// Phase 3: one (batch, head) block -> output rows, every row (padding queries too).
template <typename T>
void patch_task(void* data, size_t block_index) {
  const auto& job = *static_cast<const Job<T>*>(data);
  const auto block = static_cast<int64_t>(block_index);
  const int64_t b = block / job.heads;
  const T* in = job.block_in(block);
  T* out = job.block_out(block);
  const size_t block_bytes = static_cast<size_t>(job.q_len * job.k_len) * sizeof(T);
  if (job.patched[b] == 0) {
    // Nothing to patch for this item: the block is the input, bit for bit.
    if (out != in) std::memcpy(out, in, block_bytes);
    return;
  }
  const float* patch = job.patch + b * job.k_len;
  float* scratch = job.scratch(block);
  for (int64_t q = 0; q < job.q_len; ++q) {
    const T* row_in = in + q * job.k_len;
    T* row_out = out + q * job.k_len;
    bool changed = false, in_place = false;
    if constexpr (std::is_same_v<T, float>) {
      in_place = job.reads_in_place();
      if (in_place) changed = atpatch::patch_row(row_in, job.k_len, patch, row_out);
    }
    if (!in_place) {
      job.load_row(row_in, scratch);
      changed = atpatch::patch_row(scratch, job.k_len, patch, scratch);
      if (changed) Element<T>::from_float(scratch, job.k_len, row_out);
    }
    if (!changed && row_out != row_in) std::memcpy(row_out, row_in, job.k_len * sizeof(T));
  }
}

// Runs fn, turning every exception into an OrtStatus: none may cross into onnxruntime.
template <typename F>
OrtStatusPtr guarded(F&& fn) noexcept {
  try {
    return fn();
  } catch (const Ort::Exception& e) {
    return make_status(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return make_status(ORT_FAIL, "out of memory for the kernel's workspace; use a smaller batch or sequence");
  } catch (const std::exception& e) {
    return make_status(ORT_FAIL, e.what());
  } catch (...) {
    return make_status(ORT_FAIL, "unexpected internal error");
  }
}

// Below this many map entries the op's work is a few microseconds, about what a pool dispatch
// costs, so it runs on the calling thread (onnxruntime's own kernels make the same cost-based
// choice). It was 2^16 until 2026-12-03, when a 2-layer, 64-wide BERT at batch 32 ([32, 4, 16, 16]
// maps, 32,768 entries: 0.1 ms a map on one core) ran at 1.11x unpatched that way and 1.07-1.08x
// with the maps split over the pool (2 cores, benchmarks/latency.py; a 4-layer ViT at batch 1,
// 10,000 entries: 1.12x -> 1.10x).
constexpr int64_t kInlineElements = int64_t{1} << 12;

// fn(data, i) for i in [0, total): on the calling thread, or split by onnxruntime's intra-op pool.
inline OrtStatusPtr parallel(OrtKernelContext* ctx, void (*fn)(void*, size_t), int64_t total, void* data,
                             bool inline_run) {
  if (inline_run) {
    for (int64_t i = 0; i < total; ++i) fn(data, static_cast<size_t>(i));
    return nullptr;
  }
  // num_batch 0: let onnxruntime's intra-op pool split the range as it likes.
  return Ort::GetApi().KernelContext_ParallelFor(ctx, fn, static_cast<size_t>(total), 0, data);
}

// A job for `c` (validated, non-empty), its workspace allocated in `workspace` and `patch`;
// `in`/`out` the map (the same buffer to patch in place). Returns nullptr or the refusal.
// Neither buffer is zeroed: phase 1 clears each block's accumulators before it adds to them and
// fills its scratch row before reading it, and phase 2 writes every entry of P. Zero-filling them
// first cost a serial pass on the calling thread: 5-8% of the kernel's time on [32, 4, 50, 50] and
// [8, 12, 128, 128] maps. Sanitizer builds fill them with NaN instead (CMakeLists.txt).
template <typename T>
OrtStatusPtr make_job(const Checked& c, const void* in, void* out, bool v1, bool as_float16,
                      std::unique_ptr<float[]>* workspace, std::unique_ptr<float[]>* patch, Job<T>* job) {
  const int64_t batch = c.batch, heads = c.heads, k_len = c.k_len;
  const int64_t block_floats = v1 ? kBlockFloatsV1 : kBlockFloats;
  int64_t blocks = 0, work = 0, patch_count = 0;
  if (!checked_mul(batch, heads, &blocks) || !checked_mul(blocks, block_floats * k_len, &work) ||
      !checked_mul(batch, k_len, &patch_count) ||
      static_cast<uint64_t>(work) > std::numeric_limits<size_t>::max() / sizeof(float)) {
    return make_status(ORT_INVALID_ARGUMENT, "attention shape " + shape_str(c.shape) + " is too large for the workspace");
  }
  workspace->reset(new float[static_cast<size_t>(work)]);
  patch->reset(new float[static_cast<size_t>(patch_count)]);
#ifdef ATPATCH_POISON_WORKSPACE
  std::fill_n(workspace->get(), work, std::numeric_limits<float>::quiet_NaN());
  std::fill_n(patch->get(), patch_count, std::numeric_limits<float>::quiet_NaN());
#endif
  atpatch::DetectorView detector = c.detector;
  detector.b2 = c.b2[0];
  *job = Job<T>{static_cast<const T*>(in),
                static_cast<T*>(out),
                batch,
                heads,
                c.q_len,
                k_len,
                v1,
                as_float16,
                detector,
                workspace->get(),
                patch->get(),
                c.forced,
                c.forced_batch_stride,
                c.forced_key_stride,
                c.flags,
                c.scores,
                std::vector<int64_t>(static_cast<size_t>(batch), 0),
                {}};
  job->head_columns.reserve(static_cast<size_t>(blocks));
  for (int64_t block = 0; block < blocks; ++block) job->head_columns.push_back(job->columns(block));
  return nullptr;
}

}  // namespace atpatch::phases

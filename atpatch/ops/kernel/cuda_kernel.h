// The AtPatch op on a CUDA device: a plain C++ interface (no CUDA types), so the ORT glue
// (custom_op.cc, built by the host compiler) and the GPU self-test call the same entry point.
//
// The device code (cuda_kernel.cu) repeats core.cc's float32 arithmetic in core.cc's order:
// per-column sums run over the rows in sequence, the row sums (squares included) in core.cc's
// 16 lanes combined in double, the detector's dots in double, and no multiply-add is fused. Its output is therefore
// meant to equal the CPU kernel's bit for bit; the self-test checks it with the tolerances of
// tests/test_kernel.py and reports how many entries are bit-identical.
#pragma once

#include <cstdint>
#include <string>

namespace atpatch {
namespace cuda {

enum class Dtype { kFloat32, kFloat16 };

// One AtPatch call. Every pointer is device memory. `out` may equal `in` (the op may run in
// place); rows the spec leaves unchanged are then not written.
struct Problem {
  Dtype dtype;
  const void* in;  // [batch, heads, q_len, k_len] of float or __half
  void* out;       // same shape and type
  int64_t batch, heads, q_len, k_len;
  const float* w1;  // [kFeaturesPerHead * heads, hidden]; op v1: [kFeaturesPerHeadV1 * heads, hidden]
  const float* b1;  // [hidden]
  const float* w2;  // [hidden]
  const float* b2;  // [1]
  int64_t hidden;
  float threshold;
  bool count_every_row = false;  // op v1: every query row counts in the features, not the real ones
                                 // only, and there are no own-row features (3 per head)
  // `forced` (op v2; nullptr: none), bool bytes read at b * forced_batch_stride + j * forced_key_stride
  // (a stride is 0 on an axis it broadcasts over).
  const uint8_t* forced = nullptr;
  int64_t forced_batch_stride = 0, forced_key_stride = 0;
  uint8_t* flags = nullptr;  // the `flags` output [batch, k_len] (op v2), or nullptr
  float* scores = nullptr;   // the `scores` output [batch, k_len] (op v2, optional), or nullptr
  // Optional (tests): receives the column features, [batch, features_per_head * heads, k_len],
  // feature f of head h in row f * heads + h (spec.FEATURE_NAMES order: mass, peak, top, self,
  // opeak, ofocus); features_per_head is kFeaturesPerHead, or kFeaturesPerHeadV1 for op v1.
  float* features_out = nullptr;
};

// Enqueues the op on `stream` (a cudaStream_t; nullptr is the legacy default stream) and returns
// without waiting. Its workspace comes from the stream-ordered allocator (cudaMallocAsync) and is
// freed in stream order. Returns "" on success, else a one-line error (CUDA's own message).
// The caller has validated shapes as custom_op.cc does (rank 4, lengths <= 2^24, no overflow).
// A map with no entries (heads or q_len 0) still writes `flags`, all false, and `scores`, all -inf.
std::string run(const Problem& problem, void* stream);

}  // namespace cuda
}  // namespace atpatch

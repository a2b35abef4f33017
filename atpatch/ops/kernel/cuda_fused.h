// AtPatchAttention on a CUDA device (spec.py): a plain C++ interface, like cuda_kernel.h, so the ORT
// glue (fused_op.cc) and the self-test call the same entry point.
//
// Three steps on one stream: each query row's map row (one warp per row: scores summed over the
// depth in order, scale, bias, softmax with warp-wide max and sum) into a workspace; AtPatch on
// that workspace in place (cuda_kernel.h's run, unchanged); the weighted values (one thread per
// output entry, summed over the keys in order). No multiply-add is fused (--fmad=false, and
// explicit round-to-nearest intrinsics), so on a device the map differs from the CPU kernel's
// only where the two expf differ (an ulp or two) and in the order of the softmax's sum.
#pragma once

#include <cstdint>
#include <string>

#include "cuda_kernel.h"

namespace atpatch {
namespace cuda {

// One rank-4 operand whose batch and head axes may broadcast: element (b, h, ...) starts at
// data + b * batch_stride + h * head_stride (a stride is 0 on a broadcast axis). Device memory.
struct Operand {
  const float* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0;
};

struct FusedProblem {
  Operand query;   // [., ., q_len, depth]
  Operand key_t;   // [., ., depth, k_len]
  Operand value;   // [., ., k_len, width]
  const float* bias = nullptr;  // read at b * bias_strides[0] + h * [1] + q * [2] + k * [3]
  int64_t bias_strides[4] = {};
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, depth = 0, width = 0;
  float scale = 1.0f;
  float* output = nullptr;  // [batch, heads, q_len, width]
  // AtPatch's part: the detector, threshold, forced, flags and scores (cuda_kernel.h); run_fused
  // fills in the map, its shape and type.
  Problem patch{};
};

// Enqueues the op on `stream` and returns without waiting; "" on success, else a one-line error.
// The caller has validated the shapes as fused_op.cc does. A map with no entries writes a zero
// output, flags all false and scores all -inf.
std::string run_fused(const FusedProblem& problem, void* stream);

}  // namespace cuda
}  // namespace atpatch

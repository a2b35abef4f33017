// AtPatchAttention: attention and its patch in one op (spec.py, "AtPatchAttention"), float32, CPU
// (and CUDA with ATPATCH_CUDA).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

namespace atpatch {

constexpr const char* kFusedOpType = "AtPatchAttention";
constexpr size_t kFusedInputs = 9;   // query, key_t, bias, value, w1, b1, w2, b2, forced
constexpr size_t kFusedOutputs = 3;  // output, flags, scores
constexpr size_t kFusedDetectorInput = 4;
constexpr size_t kFusedForcedInput = 8;
constexpr const char* kScaleAttr = "scale";

// The op for the CPU execution provider; lives as long as the process (the domain refers to it).
OrtCustomOp* fused_attention_op();
#if defined(ATPATCH_WITH_CUDA)
// The op for the CUDA execution provider (cuda_fused.h).
OrtCustomOp* fused_attention_cuda_op();
#endif

}  // namespace atpatch

// Validation of an AtPatch node and of each call's inputs, shared by the CPU and CUDA kernels
// (custom_op.cc), so both refuse the same inputs with the same one-line messages, in the same
// order. Every refusal names the problem and the fix.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <string>
#include <vector>

#include "core.h"

namespace atpatch {

// Must match atpatch/ops/spec.py; tests compare them through AtPatchOpsInfo().
constexpr const char* kDomain = "ai.atpatch";
constexpr const char* kOpType = "AtPatch";
constexpr int kVersionV1 = 1;  // models patched before v2: 5 inputs, 1 output, every row counted
constexpr int kVersion = 2;    // spec.VERSION
// One registration serves both versions. onnxruntime gives all registrations of a name in a
// domain one schema, whose since-version is what it matches kernels against, so kernels for
// [1, 1] and [2, 2] could not be told apart (every node would get the first), and a second
// domain object of the same name is refused. The schema declares v2's inputs and outputs with
// `forced` and `flags` optional, and each node's version is read off its arity (NodeVersion).
constexpr int kFirstVersion = kVersionV1, kLastVersion = kVersion;
constexpr size_t kNumInputs = 6;   // attention, w1, b1, w2, b2, forced
constexpr size_t kNumOutputs = 3;  // patched, flags, scores
constexpr size_t kForcedInput = 5;
constexpr size_t kFlagsOutput = 1;
constexpr size_t kScoresOutput = 2;  // optional: the detector's column scores, for a joint rule over layers
constexpr const char* kThresholdAttr = "threshold";
constexpr float kThresholdDefault = 0.0f;
// The element type the model declares for the map (TensorProto numbering; 0: the type the kernel
// receives). onnxruntime's CPU provider runs a float16 node whose neighbours run in float32 in
// float32 too, so a map the model declares float16 can arrive unrounded: with map_type float16
// the CPU kernel reads it as the float16 map it is (spec.py, map_type).
constexpr const char* kMapTypeAttr = "map_type";
// Counts are kept in float32, exact up to 2^24: longer rows/columns would change results.
constexpr int64_t kMaxLen = int64_t{1} << 24;

OrtStatus* make_status(OrtErrorCode code, const std::string& message);
std::string shape_str(const std::vector<int64_t>& shape);
// a * b, or false when it would overflow int64.
bool checked_mul(int64_t a, int64_t b, int64_t* out);

// At kernel creation: a node's float attribute, or `fallback` (the spec's default) when it has none.
float FloatAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, float fallback);

// At kernel creation: the op version of a node, from its arity. 5 inputs and 1 output: version 1
// (a model patched before v2); 6 inputs: version 2 (`flags` and `scores` may be left off). Anything else is
// refused. A v2 node missing `forced` with one output would pass for v1: such a node is no
// valid v2 node, and v1 is what it describes.
OrtStatusPtr NodeVersion(const OrtApi& api, const OrtKernelInfo* info, int* version);

// A validated call: shapes, data pointers (host or device memory, as the provider placed them)
// and the outputs, allocated.
struct Checked {
  std::vector<int64_t> shape;
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, total = 0;
  DetectorView detector{};  // b2 left 0: see the b2 pointer; features_per_head: the node version's
  const float* b2 = nullptr;  // not read here: on the CUDA provider it is device memory
  const void* in = nullptr;   // nullptr when total == 0
  void* out = nullptr;
  // v2 only (nullptr otherwise): forced [fb, fk] read at b * forced_batch_stride + j * forced_key_stride
  // (a stride is 0 on a broadcast axis); flags [batch, k_len] (nullptr also when the node omits it).
  const uint8_t* forced = nullptr;
  int64_t forced_batch_stride = 0, forced_key_stride = 0;
  uint8_t* flags = nullptr;
  int64_t flag_count = 0;  // entries of flags: batch * k_len, 0 without flags (then flags is nullptr)
  float* scores = nullptr;  // the scores output [batch, k_len], nullptr when the node omits it or it is empty
};

// The detector's tensors, inputs first..first+3 (w1, b1, w2, b2): w1 must have the version's
// features per head rows for each of `heads`.
OrtStatusPtr ReadDetector(Ort::KernelContext& ctx, int version, int64_t heads, size_t first, Checked* c);
// `forced` (v2), input `index`: bool, rank 2, each axis 1 or the map's (broadcast to [batch, k_len]).
OrtStatusPtr ReadForced(Ort::KernelContext& ctx, size_t index, int64_t batch, int64_t k_len, Checked* c);
// The flags output `first` and the scores output after it, each [batch, k_len], where the node has
// them; `what` and `shape` name the map in the refusal when batch * k_len overflows (the message
// is built only then: these run on every call).
OrtStatusPtr AllocateFlags(Ort::KernelContext& ctx, size_t first, int64_t batch, int64_t k_len, const char* what,
                           const std::vector<int64_t>& shape, Checked* c);

// Checks one call of a node of op `version` whose attention must be `attention_type`, and
// allocates its outputs. Returns nullptr or the refusal.
OrtStatusPtr Check(Ort::KernelContext& ctx, int version, ONNXTensorElementDataType attention_type, float threshold,
                   Checked* c);

}  // namespace atpatch

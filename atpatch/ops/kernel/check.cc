// Validation of AtPatch nodes and calls: see check.h. Every failure is returned as an OrtStatus.
#include "check.h"

#include <limits>

namespace atpatch {

OrtStatus* make_status(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, ("AtPatch: " + message).c_str());
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

bool checked_mul(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

namespace {

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    default: return "another type";
  }
}

std::string counts_str(size_t inputs, size_t outputs) {
  return std::to_string(inputs) + (inputs == 1 ? " input and " : " inputs and ") + std::to_string(outputs) +
         (outputs == 1 ? " output" : " outputs");
}

}  // namespace

// w1 must have the version's features per head (kFeaturesPerHead for v2, kFeaturesPerHeadV1 for
// v1) rows per head of this map.
OrtStatusPtr ReadDetector(Ort::KernelContext& ctx, int version, int64_t heads, size_t first, Checked* c) {
  const char* names[] = {"attention", "w1", "b1", "w2", "b2"};
  std::vector<int64_t> shapes[5];
  const float* data[5] = {};
  for (size_t i = 1; i < 5; ++i) {
    Ort::ConstValue v = ctx.GetInput(first + i - 1);
    if (!v || !v.IsTensor()) return make_status(ORT_INVALID_ARGUMENT, std::string(names[i]) + " must be a tensor");
    auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      return make_status(ORT_INVALID_ARGUMENT, std::string(names[i]) + " must be float32");
    }
    shapes[i] = info.GetShape();
    data[i] = v.GetTensorData<float>();
  }
  const auto& w1 = shapes[1];
  const bool v1 = version == kVersionV1;
  const int features_per_head = v1 ? kFeaturesPerHeadV1 : kFeaturesPerHead;
  int64_t rows = 0;
  if (!checked_mul(features_per_head, heads, &rows)) {
    return make_status(ORT_INVALID_ARGUMENT, "attention has an invalid head count " + std::to_string(heads));
  }
  if (w1.size() != 2 || w1[0] != rows) {
    const int feature_version = v1 ? kFeatureVersionEveryRow : kFeatureVersion;
    return make_status(ORT_INVALID_ARGUMENT,
                       "w1 must be [" + std::to_string(features_per_head) + " * heads, hidden] = [" +
                           std::to_string(rows) + ", hidden] for this map of " + std::to_string(heads) +
                           " heads, got " + shape_str(w1) + "; fit a detector for this model (feature version " +
                           std::to_string(feature_version) + ")");
  }
  const int64_t hidden = w1[1];
  if (shapes[2] != std::vector<int64_t>{hidden} || shapes[3] != std::vector<int64_t>{hidden}) {
    return make_status(ORT_INVALID_ARGUMENT, "b1 and w2 must be [hidden] = [" + std::to_string(hidden) + "], got " +
                                                 shape_str(shapes[2]) + " and " + shape_str(shapes[3]) +
                                                 "; the detector file is inconsistent");
  }
  if (shapes[4] != std::vector<int64_t>{1}) {
    return make_status(ORT_INVALID_ARGUMENT, "b2 must be [1], got " + shape_str(shapes[4]) + "; the detector file is inconsistent");
  }
  c->detector.w1 = data[1];
  c->detector.b1 = data[2];
  c->detector.w2 = data[3];
  c->b2 = data[4];
  c->detector.hidden = hidden;
  c->detector.features_per_head = features_per_head;
  return nullptr;
}

// `forced` (v2): bool, rank 2, each axis 1 or the map's (numpy broadcasting to [batch, k_len]).
OrtStatusPtr ReadForced(Ort::KernelContext& ctx, size_t index, int64_t batch, int64_t k_len, Checked* c) {
  // The refusals' common fix, built only for a refusal: this runs on every call.
  const auto fix = [&] {
    return "; feed a bool mask [batch, k_len] = [" + std::to_string(batch) + "," + std::to_string(k_len) +
           "], or [1,1], [batch,1], [1,k_len] to broadcast";
  };
  Ort::ConstValue forced = ctx.GetInput(index);
  if (!forced || !forced.IsTensor()) {
    return make_status(ORT_INVALID_ARGUMENT, "forced is missing (op version 2 needs it; all false patches only "
                                             "what the detector flags)" + fix());
  }
  auto info = forced.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) {
    return make_status(ORT_INVALID_ARGUMENT,
                       std::string("forced must be bool, got ") + type_name(info.GetElementType()) + fix());
  }
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 2) {
    return make_status(ORT_INVALID_ARGUMENT, "forced must be rank 2, got shape " + shape_str(shape) + fix());
  }
  const bool batch_ok = shape[0] == 1 || shape[0] == batch, keys_ok = shape[1] == 1 || shape[1] == k_len;
  if (!batch_ok || !keys_ok) {
    return make_status(ORT_INVALID_ARGUMENT, "forced of shape " + shape_str(shape) + " does not broadcast to the map's " +
                                                 "[batch, k_len] = [" + std::to_string(batch) + "," +
                                                 std::to_string(k_len) + "]" + fix());
  }
  // A [1, 1] forced for a map with no keys is fine (it broadcasts); nothing is read then.
  c->forced = static_cast<const uint8_t*>(forced.GetTensorRawData());
  c->forced_key_stride = shape[1] == 1 ? 0 : 1;
  c->forced_batch_stride = shape[0] == 1 ? 0 : shape[1];
  return nullptr;
}

OrtStatusPtr AllocateFlags(Ort::KernelContext& ctx, size_t first, int64_t batch, int64_t k_len, const char* what,
                           const std::vector<int64_t>& shape, Checked* c) {
  if (ctx.GetOutputCount() <= first) return nullptr;
  // batch * k_len may overflow where the map is empty (heads or q_len 0).
  int64_t count = 0;
  if (!checked_mul(batch, k_len, &count)) {
    return make_status(ORT_INVALID_ARGUMENT, what + shape_str(shape) + " is invalid or too large");
  }
  const std::vector<int64_t> flags_shape{batch, k_len};
  Ort::UnownedValue flags = ctx.GetOutput(first, flags_shape.data(), flags_shape.size());
  if (flags && count > 0) {
    c->flags = static_cast<uint8_t*>(flags.GetTensorMutableRawData());
    c->flag_count = count;
  }
  if (ctx.GetOutputCount() > first + 1) {
    Ort::UnownedValue scores = ctx.GetOutput(first + 1, flags_shape.data(), flags_shape.size());
    if (scores && count > 0) c->scores = static_cast<float*>(scores.GetTensorMutableRawData());
  }
  return nullptr;
}

float FloatAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, float fallback) {
  float value = fallback;
  if (OrtStatus* missing = api.KernelInfoGetAttribute_float(info, name, &value)) {
    api.ReleaseStatus(missing);
    return fallback;
  }
  return value;
}

OrtStatusPtr NodeVersion(const OrtApi& api, const OrtKernelInfo* info, int* version) {
  size_t inputs = 0, outputs = 0;
  if (OrtStatus* s = api.KernelInfo_GetInputCount(info, &inputs)) return s;
  if (OrtStatus* s = api.KernelInfo_GetOutputCount(info, &outputs)) return s;
  if (inputs == 5 && outputs == 1) {
    *version = kVersionV1;
  } else if (inputs == kNumInputs && outputs >= 1 && outputs <= kNumOutputs) {
    *version = kVersion;
  } else {
    return make_status(ORT_INVALID_ARGUMENT,
                       "this node has " + counts_str(inputs, outputs) +
                           "; version 2 takes 6 inputs (attention, w1, b1, w2, b2, forced) and up to 3 outputs "
                           "(patched, flags, scores), version 1 (models patched before v2) 5 inputs and 1 output; patch the model again");
  }
  return nullptr;
}

OrtStatusPtr Check(Ort::KernelContext& ctx, int version, ONNXTensorElementDataType attention_type, float threshold,
                   Checked* c) {
  const size_t inputs = version == kVersionV1 ? 5 : kNumInputs;
  if (ctx.GetInputCount() != inputs || ctx.GetOutputCount() < 1 || ctx.GetOutputCount() > kNumOutputs) {
    return make_status(ORT_INVALID_ARGUMENT, version == kVersionV1
                                                 ? "expects 5 inputs (attention, w1, b1, w2, b2) and 1 output"
                                                 : "expects 6 inputs (attention, w1, b1, w2, b2, forced) and up to 3 outputs");
  }
  Ort::ConstValue attention = ctx.GetInput(0);
  if (!attention || !attention.IsTensor()) return make_status(ORT_INVALID_ARGUMENT, "attention must be a tensor");
  auto info = attention.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != attention_type) {
    return make_status(ORT_INVALID_ARGUMENT, "attention must be float32 or float16");
  }
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 4) {
    return make_status(ORT_INVALID_ARGUMENT, "attention must be rank 4 [batch, heads, q_len, k_len], got shape " +
                                                 shape_str(shape) + "; feed the softmax output of an attention layer");
  }

  const int64_t batch = shape[0], heads = shape[1], q_len = shape[2], k_len = shape[3];
  c->detector.threshold = threshold;
  if (OrtStatusPtr status = ReadDetector(ctx, version, heads, 1, c)) return status;

  int64_t total = 1;
  for (int64_t d : shape) {
    if (d < 0 || !checked_mul(total, d, &total)) {
      return make_status(ORT_INVALID_ARGUMENT, "attention shape " + shape_str(shape) + " is invalid or too large");
    }
  }
  if (version != kVersionV1) {
    if (OrtStatusPtr status = ReadForced(ctx, kForcedInput, batch, k_len, c)) return status;
  }
  Ort::UnownedValue output = ctx.GetOutput(0, shape.data(), shape.size());
  if (version != kVersionV1) {
    if (OrtStatusPtr status = AllocateFlags(ctx, kFlagsOutput, batch, k_len, "attention shape ", shape, c)) {
      return status;
    }
  }
  c->shape = shape;
  c->batch = batch;
  c->heads = heads;
  c->q_len = q_len;
  c->k_len = k_len;
  c->total = total;
  if (total == 0) return nullptr;  // zero-size dims: empty output, flags all false (the caller clears them)

  if (q_len > kMaxLen || k_len > kMaxLen) {
    return make_status(ORT_INVALID_ARGUMENT, "q_len and k_len must be at most 16777216 (float32 counts), got " +
                                                 shape_str(shape) + "; split the sequence");
  }
  c->in = attention.GetTensorRawData();
  c->out = output.GetTensorMutableRawData();
  return nullptr;
}

}  // namespace atpatch

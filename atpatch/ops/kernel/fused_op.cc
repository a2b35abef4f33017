// AtPatchAttention on the CPU provider (and, built with ATPATCH_CUDA, the CUDA one: cuda_fused.h):
// the map of each (batch, head) block is formed in the
// kernel's workspace, and AtPatch's three phases (phases.h) run on it before P.V; the map is never
// an onnxruntime tensor, and the patch costs one extra dispatch over plain attention's two.
//   phase A, per block: each query row's map row (fused_core.h), then the block's column features
//   phase B, per batch item: score, flag (phases.h)
//   phase C, per block: patch the rows that need it (in place), then the weighted values
#include "fused_op.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "check.h"
#include "core.h"
#include "fused_core.h"
#include "phases.h"
#if defined(ATPATCH_WITH_CUDA)
#include "cuda_fused.h"
#endif

namespace {

namespace phases = atpatch::phases;
using atpatch::checked_mul;
using atpatch::make_status;
using atpatch::shape_str;

// A rank-4 operand whose batch and head axes may broadcast (size 1), as MatMul's do.
struct Operand {
  const float* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0;  // elements; 0 on a broadcast axis
  const float* at(int64_t b, int64_t h) const { return data + b * batch_stride + h * head_stride; }
};

struct FusedJob {
  phases::Job<float> job;  // AtPatch's phases over `map`, in place
  Operand query, key_t, value;
  const float* bias = nullptr;
  int64_t bias_strides[4] = {};  // over [batch, heads, q_len, k_len]; 0 on a broadcast axis
  int64_t depth = 0, width = 0;
  float scale = 1.0f;
  float* map = nullptr;     // [batch, heads, q_len, k_len] workspace
  float* output = nullptr;  // [batch, heads, q_len, width]
  int64_t width_total = 0;  // entries of output
};

void map_task(void* data, size_t block_index) {
  auto& f = *static_cast<FusedJob*>(data);
  const phases::Job<float>& job = f.job;
  const auto block = static_cast<int64_t>(block_index);
  const int64_t b = block / job.heads, h = block % job.heads, k_len = job.k_len;
  const float* query = f.query.at(b, h);
  const float* key_t = f.key_t.at(b, h);
  const float* bias = f.bias + b * f.bias_strides[0] + h * f.bias_strides[1];
  float* map = f.map + block * job.q_len * k_len;
  for (int64_t q = 0; q < job.q_len; q += atpatch::kQueryGroup) {
    const int count = static_cast<int>(std::min<int64_t>(atpatch::kQueryGroup, job.q_len - q));
    atpatch::attention_rows(count, query + q * f.depth, f.depth, key_t, f.depth, k_len, f.scale,
                            bias + q * f.bias_strides[2], f.bias_strides[2], f.bias_strides[3], map + q * k_len);
  }
  phases::features_task<float>(&f.job, block_index);
}

void score_task(void* data, size_t item) { phases::score_task<float>(&static_cast<FusedJob*>(data)->job, item); }

void values_task(void* data, size_t block_index) {
  auto& f = *static_cast<FusedJob*>(data);
  phases::patch_task<float>(&f.job, block_index);
  const phases::Job<float>& job = f.job;
  const auto block = static_cast<int64_t>(block_index);
  const float* value = f.value.at(block / job.heads, block % job.heads);
  const float* map = f.map + block * job.q_len * job.k_len;
  float* out = f.output + block * job.q_len * f.width;
  for (int64_t q = 0; q < job.q_len; q += atpatch::kQueryGroup) {
    const int count = static_cast<int>(std::min<int64_t>(atpatch::kQueryGroup, job.q_len - q));
    atpatch::weighted_values(count, map + q * job.k_len, value, job.k_len, f.width, out + q * f.width);
  }
}

const char* const kOperandNames[] = {"query", "key_t", "bias", "value"};
const char* const kFix = "; feed query [batch, heads, q_len, depth], key_t [batch, heads, depth, k_len] and value "
                         "[batch, heads, k_len, width] (batch and heads may be 1 or left off to broadcast), bias "
                         "broadcastable to [batch, heads, q_len, k_len]";

// Reads the four attention operands, checks that they fit together and fills `f` (but its job).
OrtStatusPtr ReadOperands(Ort::KernelContext& ctx, FusedJob* f, std::vector<int64_t>* map_shape) {
  std::vector<int64_t> shapes[4];
  const float* data[4] = {};
  for (size_t i = 0; i < 4; ++i) {
    Ort::ConstValue v = ctx.GetInput(i);
    if (!v || !v.IsTensor()) return make_status(ORT_INVALID_ARGUMENT, std::string(kOperandNames[i]) + " must be a tensor");
    auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      return make_status(ORT_INVALID_ARGUMENT, std::string(kOperandNames[i]) +
                                                   " must be float32 (AtPatchAttention runs float32 attention; patch "
                                                   "a float16 model without --fuse-attention)");
    }
    shapes[i] = info.GetShape();
    const size_t rank = shapes[i].size();
    if (rank > 4 || (i != 2 && rank < 2)) {
      return make_status(ORT_INVALID_ARGUMENT, std::string(kOperandNames[i]) + " has shape " + shape_str(shapes[i]) +
                                                   (i == 2 ? ", of rank above 4" : ", not of rank 2 to 4") + kFix);
    }
    for (int64_t d : shapes[i]) {
      if (d < 0) return make_status(ORT_INVALID_ARGUMENT, std::string(kOperandNames[i]) + " has an invalid shape");
    }
    // MatMul's operands of rank 2 or 3 broadcast over the missing leading axes: pad them with 1.
    if (i != 2) shapes[i].insert(shapes[i].begin(), 4 - rank, 1);
    data[i] = v.GetTensorData<float>();
  }
  const auto &q = shapes[0], &kt = shapes[1], &v = shapes[3];
  const std::string shapes_str = ": query " + shape_str(q) + ", key_t " + shape_str(kt) + ", value " + shape_str(v);
  if (q[3] != kt[2] || kt[3] != v[2]) {
    return make_status(ORT_INVALID_ARGUMENT, "the operands' depths or key lengths differ" + shapes_str + kFix);
  }
  int64_t full[2] = {1, 1};  // numpy's broadcasting: a 1 takes the other size, 0 included
  for (int axis = 0; axis < 2; ++axis) {
    for (const auto* s : {&q, &kt, &v}) {
      const int64_t dim = (*s)[axis];
      if (dim == 1 || dim == full[axis]) continue;
      if (full[axis] != 1) {
        return make_status(ORT_INVALID_ARGUMENT, std::string("the operands' ") + (axis == 0 ? "batch" : "heads") +
                                                     " do not broadcast" + shapes_str + kFix);
      }
      full[axis] = dim;
    }
  }
  *map_shape = {full[0], full[1], q[2], kt[3]};
  const auto operand = [](const float* p, const std::vector<int64_t>& s) {
    const int64_t block = s[2] * s[3];
    return Operand{p, s[0] == 1 ? 0 : s[1] * block, s[1] == 1 ? 0 : block};
  };
  f->query = operand(data[0], q);
  f->key_t = operand(data[1], kt);
  f->value = operand(data[3], v);
  f->depth = q[3];
  f->width = v[3];
  // bias: right-aligned to [batch, heads, q_len, k_len], row-major strides, 0 where it broadcasts.
  const auto& bias = shapes[2];
  const size_t skip = 4 - bias.size();
  int64_t stride = 1;
  for (int axis = 3; axis >= 0; --axis) {
    const int64_t dim = axis < static_cast<int>(skip) ? 1 : bias[axis - skip];
    if (dim != 1 && dim != (*map_shape)[axis]) {
      return make_status(ORT_INVALID_ARGUMENT, "bias of shape " + shape_str(bias) + " does not broadcast to the map's " +
                                                   shape_str(*map_shape) + kFix);
    }
    f->bias_strides[axis] = dim == 1 ? 0 : stride;
    stride *= dim;
  }
  f->bias = data[2];
  return nullptr;
}

// A checked call: the operands in `f` (but its job), the map's shape and the AtPatch part in `c`,
// the outputs allocated (on the provider's device).
OrtStatusPtr Prepare(Ort::KernelContext& ctx, float threshold, FusedJob* f, atpatch::Checked* c) {
  if (ctx.GetInputCount() != atpatch::kFusedInputs || ctx.GetOutputCount() < 1 ||
      ctx.GetOutputCount() > atpatch::kFusedOutputs) {
    return make_status(ORT_INVALID_ARGUMENT, "AtPatchAttention expects 9 inputs (query, key_t, bias, value, w1, b1, "
                                             "w2, b2, forced) and up to 3 outputs (output, flags, scores)");
  }
  if (OrtStatusPtr s = ReadOperands(ctx, f, &c->shape)) return s;
  const int64_t batch = c->shape[0], heads = c->shape[1], q_len = c->shape[2], k_len = c->shape[3];
  c->detector.threshold = threshold;
  if (OrtStatusPtr s = atpatch::ReadDetector(ctx, atpatch::kVersion, heads, atpatch::kFusedDetectorInput, c)) return s;
  if (OrtStatusPtr s = atpatch::ReadForced(ctx, atpatch::kFusedForcedInput, batch, k_len, c)) return s;
  const std::vector<int64_t> out_shape{batch, heads, q_len, f->width};
  int64_t total = 1, out_total = 1;
  for (int axis = 0; axis < 4; ++axis) {
    if (!checked_mul(total, c->shape[axis], &total) || !checked_mul(out_total, out_shape[axis], &out_total)) {
      return make_status(ORT_INVALID_ARGUMENT, "attention of shape " + shape_str(c->shape) + " is too large");
    }
  }
  if (static_cast<uint64_t>(std::max(total, out_total)) > std::numeric_limits<size_t>::max() / sizeof(float)) {
    return make_status(ORT_INVALID_ARGUMENT, "attention of shape " + shape_str(c->shape) + " is too large");
  }
  f->output = ctx.GetOutput(0, out_shape.data(), out_shape.size()).GetTensorMutableData<float>();
  if (OrtStatusPtr s = atpatch::AllocateFlags(ctx, 1, batch, k_len, "attention of shape ", c->shape, c)) {
    return s;
  }
  if (q_len > atpatch::kMaxLen || k_len > atpatch::kMaxLen) {
    return make_status(ORT_INVALID_ARGUMENT, "q_len and k_len must be at most 16777216 (float32 counts), got " +
                                                 shape_str(c->shape) + "; split the sequence");
  }
  c->batch = batch, c->heads = heads, c->q_len = q_len, c->k_len = k_len, c->total = total;
  f->width_total = out_total;
  return nullptr;
}

// The CPU provider's run of a prepared call.
struct Cpu {
  static constexpr const char* kProvider = "CPUExecutionProvider";
  static OrtStatusPtr Run(OrtKernelContext* raw, Ort::KernelContext& /*ctx*/, float /*threshold*/, float scale,
                          FusedJob& f, const atpatch::Checked& c) {
    if (c.total == 0) {  // no map: weights over no keys sum to 0, and nothing is flagged
      if (f.width_total > 0) std::memset(f.output, 0, static_cast<size_t>(f.width_total) * sizeof(float));
      if (c.flag_count > 0) std::memset(c.flags, 0, static_cast<size_t>(c.flag_count));
      if (c.scores != nullptr) {
        std::fill_n(c.scores, static_cast<size_t>(c.batch * c.k_len), -std::numeric_limits<float>::infinity());
      }
      return nullptr;
  }
  // Every entry is written by phase A before it is read: no need to clear the map.
  const std::unique_ptr<float[]> map(new float[static_cast<size_t>(c.total)]);
  std::unique_ptr<float[]> workspace, patch;
  if (OrtStatusPtr s = phases::make_job(c, map.get(), map.get(), false, false, &workspace, &patch, &f.job)) return s;
  f.map = map.get();
  f.scale = scale;
  const int64_t blocks = c.batch * c.heads;
  // AtPatch's inline rule in its units (a map entry costs it about 8 operations); here an entry also
  // costs depth multiply-adds to form and width to weigh the values.
  int64_t work = 0;
  const bool inline_run = checked_mul(c.total, f.depth + f.width + 8, &work) && work < phases::kInlineElements * 8;
  if (OrtStatusPtr s = phases::parallel(raw, &map_task, blocks, &f, inline_run)) return s;
  if (OrtStatusPtr s = phases::parallel(raw, &score_task, c.batch, &f, inline_run)) return s;
  return phases::parallel(raw, &values_task, blocks, &f, inline_run);
  }
};

#if defined(ATPATCH_WITH_CUDA)
// The CUDA provider's: every input and output is device memory; the kernels are enqueued on
// onnxruntime's compute stream (cuda_fused.h).
struct Cuda {
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  static OrtStatusPtr Run(OrtKernelContext* /*raw*/, Ort::KernelContext& ctx, float threshold, float scale,
                          FusedJob& f, const atpatch::Checked& c) {
    void* stream = ctx.GetGPUComputeStream();
    if (stream == nullptr) {
      return make_status(ORT_FAIL, "onnxruntime gave no CUDA compute stream; run the model with ATPATCH_NATIVE=0");
  }
  atpatch::cuda::FusedProblem p;
  const auto operand = [](const Operand& o) {
    return atpatch::cuda::Operand{o.data, o.batch_stride, o.head_stride};
  };
  p.query = operand(f.query);
  p.key_t = operand(f.key_t);
  p.value = operand(f.value);
  p.bias = f.bias;
  std::copy(f.bias_strides, f.bias_strides + 4, p.bias_strides);
  p.batch = c.batch, p.heads = c.heads, p.q_len = c.q_len, p.k_len = c.k_len, p.depth = f.depth, p.width = f.width;
  p.scale = scale;
  p.output = f.output;
  p.patch.w1 = c.detector.w1;
  p.patch.b1 = c.detector.b1;
  p.patch.w2 = c.detector.w2;
  p.patch.b2 = c.b2;
  p.patch.hidden = c.detector.hidden;
  p.patch.threshold = threshold;
  p.patch.forced = c.forced;
  p.patch.forced_batch_stride = c.forced_batch_stride;
  p.patch.forced_key_stride = c.forced_key_stride;
  p.patch.flags = c.flags;
  p.patch.scores = c.scores;
  const std::string error = atpatch::cuda::run_fused(p, stream);
  return error.empty() ? nullptr : make_status(ORT_FAIL, "CUDA kernel: " + error);
  }
};
#endif

// The fused op's kernel on one provider: the call checked and its outputs allocated (Prepare), then
// the provider's run.
template <typename Backend>
struct FusedKernel {
  using Elem = float;
  static constexpr const char* kProvider = Backend::kProvider;
  FusedKernel(float threshold, float scale) : threshold_(threshold), scale_(scale) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) const noexcept {
    return phases::guarded([&] {
      Ort::KernelContext ctx(raw);
      FusedJob f;
      atpatch::Checked c;
      if (OrtStatusPtr s = Prepare(ctx, threshold_, &f, &c)) return s;
      return Backend::Run(raw, ctx, threshold_, scale_, f, c);
    });
  }

 private:
  const float threshold_;
  const float scale_;
};

template <typename Kernel>
struct FusedOp : Ort::CustomOpBase<FusedOp<Kernel>, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    size_t inputs = 0, outputs = 0;
    if (OrtStatus* s = api.KernelInfo_GetInputCount(info, &inputs)) return s;
    if (OrtStatus* s = api.KernelInfo_GetOutputCount(info, &outputs)) return s;
    if (inputs != atpatch::kFusedInputs || outputs < 1 || outputs > atpatch::kFusedOutputs) {
      return make_status(ORT_INVALID_ARGUMENT, "this AtPatchAttention node has " + std::to_string(inputs) +
                                                   " inputs and " + std::to_string(outputs) +
                                                   " outputs; it takes 9 inputs (query, key_t, bias, value, w1, b1, "
                                                   "w2, b2, forced) and up to 3 outputs; patch the model again");
    }
    const float threshold = atpatch::FloatAttribute(api, info, atpatch::kThresholdAttr, atpatch::kThresholdDefault);
    const float scale = atpatch::FloatAttribute(api, info, atpatch::kScaleAttr, 1.0f);
    try {
      *kernel = new Kernel(threshold, scale);
    } catch (const std::bad_alloc&) {
      return make_status(ORT_FAIL, "out of memory creating the kernel");
    }
    return nullptr;
  }

  const char* GetName() const { return atpatch::kFusedOpType; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return atpatch::kFusedInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    // `forced` takes any type here so that a wrong one reaches ReadForced, which names the fix.
    return index == atpatch::kFusedForcedInput ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                               : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return atpatch::kFusedOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

namespace atpatch {

OrtCustomOp* fused_attention_op() {
  static FusedOp<FusedKernel<Cpu>> op;
  return &op;
}

#if defined(ATPATCH_WITH_CUDA)
OrtCustomOp* fused_attention_cuda_op() {
  static FusedOp<FusedKernel<Cuda>> op;
  return &op;
}
#endif

}  // namespace atpatch

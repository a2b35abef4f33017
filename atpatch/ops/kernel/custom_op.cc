// onnxruntime custom-op glue for AtPatch: threading, registration (validation: check.cc).
// Op versions 1 and 2 are both registered, on one code path: version 1 (models patched before
// v2) counts every query row in the features and has no `forced` input and no `flags` output.
//
// Links nothing from onnxruntime: the API table comes from the OrtApiBase handed to
// RegisterCustomOps (ORT_API_MANUAL_INIT), so headers of ORT 1.21 (API 21) serve any
// newer runtime. Every failure is returned as an OrtStatus; no exception leaves this file.
// Built with ATPATCH_WITH_CUDA (CMake option ATPATCH_CUDA), the same domain also gets the op
// for the CUDA execution provider (cuda_kernel.h): one library, both providers, because two
// libraries that each register ai.atpatch cannot be loaded into one session.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "core.h"
#include "fused_op.h"
#include "phases.h"
#if defined(ATPATCH_WITH_CUDA)
#include "cuda_kernel.h"
#endif

#if defined(_WIN32)
#define ATPATCH_EXPORT extern "C" __declspec(dllexport)
#else
#define ATPATCH_EXPORT extern "C" __attribute__((visibility("default")))
#endif

#define ATPATCH_STR2(x) #x
#define ATPATCH_STR(x) ATPATCH_STR2(x)

namespace {

namespace phases = atpatch::phases;
using atpatch::checked_mul;
using atpatch::phases::Element;
using atpatch::phases::guarded;
using atpatch::make_status;
using atpatch::shape_str;

// How often Compute ran on a non-empty map, and how often onnxruntime handed it the input's
// buffer as its output (MayInplace honoured, so a clean map costs no copy): AtPatchComputeCounts.
std::atomic<uint64_t> g_computes{0};
std::atomic<uint64_t> g_in_place{0};


template <typename T>
struct AtPatchKernel {
  using Elem = T;
  static constexpr const char* kProvider = "CPUExecutionProvider";
  AtPatchKernel(float threshold, int version, int64_t map_type)
      : threshold_(threshold),
        version_(version),
        as_float16_(std::is_same_v<T, float> && map_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    return guarded([&] { return Compute(context); });
  }

 private:
  OrtStatusPtr Compute(OrtKernelContext* raw) const {
    Ort::KernelContext ctx(raw);
    atpatch::Checked c;
    if (OrtStatusPtr status = atpatch::Check(ctx, version_, Element<T>::type, threshold_, &c)) return status;
    if (c.total == 0) {  // zero-size dims: the empty output is the answer, and nothing is flagged
      if (c.flag_count > 0) std::memset(c.flags, 0, static_cast<size_t>(c.flag_count));
      if (c.scores != nullptr) {
        std::fill_n(c.scores, static_cast<size_t>(c.batch * c.k_len), -std::numeric_limits<float>::infinity());
      }
      return nullptr;
    }
    g_computes.fetch_add(1, std::memory_order_relaxed);
    if (c.out == c.in) g_in_place.fetch_add(1, std::memory_order_relaxed);
    std::unique_ptr<float[]> workspace, patch;
    phases::Job<T> job;
    if (OrtStatusPtr s = phases::make_job(c, c.in, c.out, version_ == atpatch::kVersionV1, as_float16_, &workspace,
                                          &patch, &job)) {
      return s;
    }
    const int64_t blocks = c.batch * c.heads;
    const bool inline_run = c.total < phases::kInlineElements;
    if (OrtStatusPtr s = phases::parallel(raw, &phases::features_task<T>, blocks, &job, inline_run)) return s;
    if (OrtStatusPtr s = phases::parallel(raw, &phases::score_task<T>, c.batch, &job, inline_run)) return s;
    // In place with nothing to patch (a clean input, the common case): phase 3 has nothing to do,
    // and its pool dispatch alone is what it would cost.
    const bool nothing_patched = std::all_of(job.patched.begin(), job.patched.end(), [](int64_t n) { return n == 0; });
    if (c.out == c.in && nothing_patched) return nullptr;
    return phases::parallel(raw, &phases::patch_task<T>, blocks, &job, inline_run);
  }

  // Read-only after construction: Compute runs concurrently.
  const float threshold_;
  const int version_;
  const bool as_float16_;
};

#if defined(ATPATCH_WITH_CUDA)
// The op on onnxruntime's CUDA provider: every input and output is device memory (the default
// memory type of a CUDA custom op), `forced` and `flags` included; the four kernels are
// enqueued on onnxruntime's compute stream and not waited for, as the provider's own kernels do.
template <typename T>
struct AtPatchCudaKernel {
  using Elem = T;
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  // map_type is not read: onnxruntime's CUDA provider runs a float16 map's Softmax and MatMul in
  // float16, so it never hands this kernel a float16 map as float32.
  AtPatchCudaKernel(float threshold, int version, int64_t /*map_type*/) : threshold_(threshold), version_(version) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    return guarded([&] { return Compute(context); });
  }

 private:
  OrtStatusPtr Compute(OrtKernelContext* raw) const {
    Ort::KernelContext ctx(raw);
    atpatch::Checked c;
    if (OrtStatusPtr status = atpatch::Check(ctx, version_, Element<T>::type, threshold_, &c)) return status;
    if (c.total == 0 && c.flag_count == 0 && c.scores == nullptr) return nullptr;  // else flags/scores to write
    void* stream = ctx.GetGPUComputeStream();
    if (stream == nullptr) {
      return make_status(ORT_FAIL, "onnxruntime gave no CUDA compute stream; run the model with ATPATCH_NATIVE=0");
    }
    static_assert(sizeof(T) == 4 || sizeof(T) == 2, "float32 or float16");
    atpatch::cuda::Problem p{};
    p.dtype = std::is_same_v<T, float> ? atpatch::cuda::Dtype::kFloat32 : atpatch::cuda::Dtype::kFloat16;
    p.in = c.in;
    p.out = c.out;
    p.batch = c.batch;
    p.heads = c.total == 0 ? 0 : c.heads;  // zero-size map: only the flags are written
    p.q_len = c.q_len;
    p.k_len = c.k_len;
    p.w1 = c.detector.w1;
    p.b1 = c.detector.b1;
    p.w2 = c.detector.w2;
    p.b2 = c.b2;
    p.hidden = c.detector.hidden;
    p.threshold = threshold_;
    p.count_every_row = version_ == atpatch::kVersionV1;
    p.forced = c.forced;
    p.forced_batch_stride = c.forced_batch_stride;
    p.forced_key_stride = c.forced_key_stride;
    p.flags = c.flags;
    p.scores = c.scores;
    const std::string error = atpatch::cuda::run(p, stream);
    return error.empty() ? nullptr : make_status(ORT_FAIL, "CUDA kernel: " + error);
  }

  const float threshold_;
  const int version_;
};
#endif

// One registration of the op: a kernel type (provider, dtype) for op versions 1 and 2 (see
// check.h for why one registration serves both): kNumInputs inputs and kNumOutputs outputs, the
// last of each optional, as a v1 node has neither.
template <typename Kernel>
struct AtPatchOp : Ort::CustomOpBase<AtPatchOp<Kernel>, Kernel, /*WithStatus=*/true> {
  using T = typename Kernel::Elem;
  AtPatchOp() {
    this->start_ver_ = atpatch::kFirstVersion;
    this->end_ver_ = atpatch::kLastVersion;
    // The output may reuse the attention buffer: then untouched rows cost nothing.
    OrtCustomOp::GetMayInplace = &MayInplace;
    OrtCustomOp::ReleaseMayInplace = &ReleaseMayInplace;
    // onnxruntime's planner reuses an input's buffer only for an output whose shape it knows to be
    // the same: without this, MayInplace was never honoured and every clean map was copied.
    OrtCustomOp::InferOutputShapeFn = &OutputShapes;
  }

  // The patched map has the attention's type and shape; flags are bool [batch, k_len]. A rank
  // other than 4, or a dim neither known nor named, is left unknown here (Compute names problems).
  // The flags output may be absent (op v1, or a node that leaves it out), so failing to describe
  // it is not an error. The scores output is not described: onnxruntime refuses a description of
  // an output the node lacks (it failed the session), and this context cannot say how many the
  // node has; its type comes from GetOutputType, and nothing downstream needs its shape.
  static OrtStatusPtr ORT_API_CALL OutputShapes(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
    const OrtApi& api = Ort::GetApi();
    OrtTensorTypeAndShapeInfo* in = nullptr;  // owned by ctx
    if (OrtStatusPtr s = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &in)) return s;
    size_t rank = 0;
    if (OrtStatusPtr s = api.GetDimensionsCount(in, &rank)) return s;
    if (rank != 4) return nullptr;
    int64_t dims[4] = {};
    const char* names[4] = {};
    if (OrtStatusPtr s = api.GetDimensions(in, dims, 4)) return s;
    if (OrtStatusPtr s = api.GetSymbolicDimensions(in, names, 4)) return s;
    for (int axis = 0; axis < 4; ++axis) {
      // An unknown, unnamed dim would come back as the value -1, which later shape inference
      // reads as a real -1 (Reshape then refuses "multiple -1 dimensions"): leave it all unknown.
      if (dims[axis] < 0 && (names[axis] == nullptr || names[axis][0] == '\0')) return nullptr;
    }
    if (OrtStatusPtr s = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, in)) return s;
    OrtTensorTypeAndShapeInfo* flags = nullptr;
    OrtStatusPtr s = api.CreateTensorTypeAndShapeInfo(&flags);
    if (s == nullptr) s = api.SetTensorElementType(flags, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL);
    const int64_t flag_dims[2] = {dims[0], dims[3]};
    const char* flag_names[2] = {names[0] ? names[0] : "", names[3] ? names[3] : ""};
    if (s == nullptr) s = api.SetDimensions(flags, flag_dims, 2);
    if (s == nullptr) s = api.SetSymbolicDimensions(flags, flag_names, 2);
    if (s == nullptr) s = api.ShapeInferContext_SetOutputTypeShape(ctx, atpatch::kFlagsOutput, flags);
    if (s != nullptr) api.ReleaseStatus(s);
    if (flags != nullptr) api.ReleaseTensorTypeAndShapeInfo(flags);
    return nullptr;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    int version = 0;
    if (OrtStatusPtr status = atpatch::NodeVersion(api, info, &version)) return status;
    const float threshold = atpatch::FloatAttribute(api, info, atpatch::kThresholdAttr, atpatch::kThresholdDefault);
    int64_t map_type = 0;
    if (OrtStatus* missing = api.KernelInfoGetAttribute_int64(info, atpatch::kMapTypeAttr, &map_type)) {
      api.ReleaseStatus(missing);  // absent: the type received
      map_type = 0;
    }
    try {
      *kernel = new Kernel(threshold, version, map_type);
    } catch (const std::bad_alloc&) {
      return make_status(ORT_FAIL, "out of memory creating the kernel");
    }
    return nullptr;
  }

  const char* GetName() const { return atpatch::kOpType; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return atpatch::kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == 0) return Element<T>::type;
    // `forced` takes any type here so that a wrong one reaches Check, which names the fix.
    return index == atpatch::kForcedInput ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == atpatch::kForcedInput ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return atpatch::kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    if (index == atpatch::kScoresOutput) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return index == atpatch::kFlagsOutput ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : Element<T>::type;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

  static size_t ORT_API_CALL MayInplace(int** input_index, int** output_index) {
    *input_index = new (std::nothrow) int[1]{0};
    *output_index = new (std::nothrow) int[1]{0};
    if (*input_index == nullptr || *output_index == nullptr) {
      delete[] *input_index;
      delete[] *output_index;
      *input_index = *output_index = nullptr;
      return 0;
    }
    return 1;
  }
  static void ORT_API_CALL ReleaseMayInplace(int* input_index, int* output_index) {
    delete[] input_index;
    delete[] output_index;
  }
};

// One domain object shared by every session: onnxruntime only reads it, and it must
// outlive them all, so it is created once and never released.
OrtCustomOpDomain* shared_domain(const OrtApi& api, OrtStatus** status) {
  static AtPatchOp<AtPatchKernel<float>> op_float;
  static AtPatchOp<AtPatchKernel<Ort::Float16_t>> op_half;
#if defined(ATPATCH_WITH_CUDA)
  static AtPatchOp<AtPatchCudaKernel<float>> cuda_float;
  static AtPatchOp<AtPatchCudaKernel<Ort::Float16_t>> cuda_half;
#endif
  static std::once_flag once;
  static OrtCustomOpDomain* domain = nullptr;
  std::call_once(once, [&] {
    OrtCustomOpDomain* d = nullptr;
    if ((*status = api.CreateCustomOpDomain(atpatch::kDomain, &d))) return;
    if ((*status = api.CustomOpDomain_Add(d, &op_float))) return;
    if ((*status = api.CustomOpDomain_Add(d, &op_half))) return;
    if ((*status = api.CustomOpDomain_Add(d, atpatch::fused_attention_op()))) return;
#if defined(ATPATCH_WITH_CUDA)
    if ((*status = api.CustomOpDomain_Add(d, &cuda_float))) return;
    if ((*status = api.CustomOpDomain_Add(d, &cuda_half))) return;
    if ((*status = api.CustomOpDomain_Add(d, atpatch::fused_attention_cuda_op()))) return;
#endif
    domain = d;
  });
  return domain;
}

}  // namespace

ATPATCH_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Older runtime than the headers: report through the oldest API table, which always exists.
    const OrtApi* oldest = api_base->GetApi(1);
    std::string message = std::string("AtPatch: the native kernel needs onnxruntime API ") +
                          std::to_string(ORT_API_VERSION) + " or newer, this runtime is " +
                          api_base->GetVersionString() + "; upgrade onnxruntime or set ATPATCH_NATIVE=0";
    return oldest ? oldest->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  OrtStatus* status = nullptr;
  OrtCustomOpDomain* domain = shared_domain(*api, &status);
  if (status) return status;
  if (domain == nullptr) return make_status(ORT_FAIL, "creating the custom-op domain failed earlier in this process");
  return api->AddCustomOpDomain(options, domain);
}

// The registered contract, for tests to compare with atpatch/ops/spec.py. "providers" is what
// atpatch.runtime.native reads to decide which sessions the library covers; "versions" lists
// the op versions registered, "v1" what version 1 differs in.
#if defined(ATPATCH_WITH_CUDA)
#define ATPATCH_PROVIDER_LIST "[\"CPUExecutionProvider\", \"CUDAExecutionProvider\"]"
#define ATPATCH_PROVIDERS_JSON                                                             \
  "\"providers\": " ATPATCH_PROVIDER_LIST ", \"cuda_runtime\": \"" \
  ATPATCH_CUDA_RUNTIME "\", \"cuda_architectures\": \"" ATPATCH_CUDA_ARCHITECTURES "\", "
#else
#define ATPATCH_PROVIDER_LIST "[\"CPUExecutionProvider\"]"
#define ATPATCH_PROVIDERS_JSON "\"providers\": " ATPATCH_PROVIDER_LIST ", "
#endif
static_assert(atpatch::kFeaturesPerHead == 6 && atpatch::kFeaturesPerHeadV1 == 3 && atpatch::kFeatureVersion == 4 &&
                  atpatch::kFeatureVersionEveryRow == 2 && atpatch::kVersion == 2 && atpatch::kVersionV1 == 1,
              "AtPatchOpsInfo spells out the versions, features_per_head and feature_version: update it");
ATPATCH_EXPORT const char* AtPatchOpsInfo() {
  return "{\"domain\": \"ai.atpatch\", \"op_type\": \"AtPatch\", \"version\": 2, \"versions\": [1, 2], "
         "\"inputs\": [\"attention\", \"w1\", \"b1\", \"w2\", \"b2\", \"forced\"], \"outputs\": [\"patched\", \"flags\", \"scores\"], "
         "\"attributes\": {\"threshold\": 0.0, \"map_type\": 0}, \"features_per_head\": 6, \"feature_version\": 4, "
         "\"feature_names\": [\"mass\", \"peak\", \"top\", \"self\", \"opeak\", \"ofocus\"], "
         "\"v1\": {\"inputs\": [\"attention\", \"w1\", \"b1\", \"w2\", \"b2\"], \"outputs\": [\"patched\"], "
         "\"features_per_head\": 3, \"feature_version\": 2}, "
         "\"dtypes\": [\"float32\", \"float16\"], "
         "\"fused\": {\"op_type\": \"AtPatchAttention\", \"inputs\": [\"query\", \"key_t\", \"bias\", \"value\", \"w1\", "
         "\"b1\", \"w2\", \"b2\", \"forced\"], \"outputs\": [\"output\", \"flags\", \"scores\"], "
         "\"attributes\": {\"scale\": 1.0, \"threshold\": 0.0}, \"dtypes\": [\"float32\"], "
         "\"providers\": " ATPATCH_PROVIDER_LIST "}, " ATPATCH_PROVIDERS_JSON
         "\"ort_api_version\": " ATPATCH_STR(ORT_API_VERSION) "}";
}

// Counts since the library was loaded (CPU kernel, every session in the process): Compute calls
// on non-empty maps, and those whose output buffer was the input's. Either pointer may be null.
ATPATCH_EXPORT void AtPatchComputeCounts(uint64_t* computes, uint64_t* in_place) {
  if (computes != nullptr) *computes = g_computes.load(std::memory_order_relaxed);
  if (in_place != nullptr) *in_place = g_in_place.load(std::memory_order_relaxed);
}

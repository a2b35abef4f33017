// onnxruntime custom-op glue for AtPatch: validation, threading, registration.
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

#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "core.h"
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

// Must match atpatch/ops/spec.py; tests compare them through AtPatchOpsInfo().
constexpr const char* kDomain = "ai.atpatch";
constexpr const char* kOpType = "AtPatch";
constexpr int kVersion = 1;
constexpr size_t kNumInputs = 5;  // attention, w1, b1, w2, b2
constexpr const char* kThresholdAttr = "threshold";
constexpr float kThresholdDefault = 0.0f;
// Counts are kept in float32, exact up to 2^24: longer rows/columns would change results.
constexpr int64_t kMaxLen = int64_t{1} << 24;
// Workspace floats per (batch, head) block and key column: 4 accumulators + 1 row scratch.
constexpr int64_t kBlockFloats = 5;

OrtStatus* make_status(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, ("AtPatch: " + message).c_str());
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// a * b, or false when it would overflow int64.
bool checked_mul(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

template <typename T>
struct Element;
template <>
struct Element<float> {
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  static void to_float(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }
};
template <>
struct Element<Ort::Float16_t> {
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  static void to_float(const Ort::Float16_t* src, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i].ToFloat();
  }
  static void from_float(const float* src, int64_t n, Ort::Float16_t* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = Ort::Float16_t(src[i]);
  }
};

// The detector's tensors; w1 must have kFeaturesPerHead rows per head of this map.
OrtStatusPtr ReadDetector(Ort::KernelContext& ctx, int64_t heads, atpatch::DetectorView* d, const float** b2) {
  const char* names[kNumInputs] = {"attention", "w1", "b1", "w2", "b2"};
  std::vector<int64_t> shapes[kNumInputs];
  const float* data[kNumInputs] = {};
  for (size_t i = 1; i < kNumInputs; ++i) {
    Ort::ConstValue v = ctx.GetInput(i);
    if (!v || !v.IsTensor()) return make_status(ORT_INVALID_ARGUMENT, std::string(names[i]) + " must be a tensor");
    auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      return make_status(ORT_INVALID_ARGUMENT, std::string(names[i]) + " must be float32");
    }
    shapes[i] = info.GetShape();
    data[i] = v.GetTensorData<float>();
  }
  const auto& w1 = shapes[1];
  int64_t rows = 0;
  if (!checked_mul(atpatch::kFeaturesPerHead, heads, &rows)) {
    return make_status(ORT_INVALID_ARGUMENT, "attention has an invalid head count " + std::to_string(heads));
  }
  if (w1.size() != 2 || w1[0] != rows) {
    return make_status(ORT_INVALID_ARGUMENT,
                       "w1 must be [" + std::to_string(atpatch::kFeaturesPerHead) + " * heads, hidden] = [" +
                           std::to_string(rows) + ", hidden] for this map of " + std::to_string(heads) +
                           " heads, got " + shape_str(w1) + "; fit a detector for this model (feature version " +
                           std::to_string(atpatch::kFeatureVersion) + ")");
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
  d->w1 = data[1];
  d->b1 = data[2];
  d->w2 = data[3];
  *b2 = data[4];  // not read here: on the CUDA provider it is device memory
  d->hidden = hidden;
  return nullptr;
}

// A validated call: shapes, data pointers (host or device memory, as the provider placed them)
// and the output, allocated. Shared by the CPU and CUDA kernels, so both refuse the same inputs
// with the same messages, in the same order.
template <typename T>
struct Checked {
  std::vector<int64_t> shape;
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, total = 0;
  atpatch::DetectorView detector{};  // b2 left 0: see the b2 pointer
  const float* b2 = nullptr;
  const T* in = nullptr;
  T* out = nullptr;
};

template <typename T>
OrtStatusPtr Check(Ort::KernelContext& ctx, float threshold, Checked<T>* c) {
  if (ctx.GetInputCount() != kNumInputs || ctx.GetOutputCount() != 1) {
    return make_status(ORT_INVALID_ARGUMENT, "expects 5 inputs (attention, w1, b1, w2, b2) and 1 output");
  }
  Ort::ConstValue attention = ctx.GetInput(0);
  auto info = attention.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != Element<T>::type) {
    return make_status(ORT_INVALID_ARGUMENT, "attention must be float32 or float16");
  }
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 4) {
    return make_status(ORT_INVALID_ARGUMENT, "attention must be rank 4 [batch, heads, q_len, k_len], got shape " +
                                                 shape_str(shape) + "; feed the softmax output of an attention layer");
  }

  const int64_t batch = shape[0], heads = shape[1], q_len = shape[2], k_len = shape[3];
  c->detector.threshold = threshold;
  if (OrtStatusPtr status = ReadDetector(ctx, heads, &c->detector, &c->b2)) return status;

  int64_t total = 1;
  for (int64_t d : shape) {
    if (d < 0 || !checked_mul(total, d, &total)) {
      return make_status(ORT_INVALID_ARGUMENT, "attention shape " + shape_str(shape) + " is invalid or too large");
    }
  }
  Ort::UnownedValue output = ctx.GetOutput(0, shape.data(), shape.size());
  c->shape = shape;
  c->batch = batch;
  c->heads = heads;
  c->q_len = q_len;
  c->k_len = k_len;
  c->total = total;
  if (total == 0) return nullptr;  // zero-size dims: the empty output is the answer

  if (q_len > kMaxLen || k_len > kMaxLen) {
    return make_status(ORT_INVALID_ARGUMENT, "q_len and k_len must be at most 16777216 (float32 counts), got " +
                                                 shape_str(shape) + "; split the sequence");
  }
  c->in = attention.GetTensorData<T>();
  c->out = output.GetTensorMutableData<T>();
  return nullptr;
}

// Everything one Compute call shares with its parallel tasks (read-only except the
// per-block / per-item slices each task owns).
template <typename T>
struct Job {
  const T* in;
  T* out;
  int64_t batch, heads, q_len, k_len;
  atpatch::DetectorView detector;
  float* workspace;         // [batch*heads, kBlockFloats, k_len]
  float* flags;             // [batch, k_len], 1.0 = flagged
  std::vector<int64_t> flagged;  // per batch item: flagged columns
  std::vector<atpatch::HeadColumns> head_columns;  // per block, views into workspace

  atpatch::HeadColumns columns(int64_t block) const {
    float* base = workspace + block * kBlockFloats * k_len;
    return {base, base + k_len, base + 2 * k_len, base + 3 * k_len};
  }
  float* scratch(int64_t block) const { return workspace + (block * kBlockFloats + 4) * k_len; }
  const T* block_in(int64_t block) const { return in + block * q_len * k_len; }
  T* block_out(int64_t block) const { return out + block * q_len * k_len; }
};

// Phase 1: one (batch, head) block -> its column features.
template <typename T>
void features_task(void* data, size_t block_index) {
  const auto& job = *static_cast<const Job<T>*>(data);
  const auto block = static_cast<int64_t>(block_index);
  const atpatch::HeadColumns cols = job.columns(block);
  atpatch::clear_columns(cols, job.k_len);
  const T* rows = job.block_in(block);
  float* scratch = job.scratch(block);
  for (int64_t q = 0; q < job.q_len; ++q) {
    const float* row;
    if constexpr (std::is_same_v<T, float>) {
      row = rows + q * job.k_len;
    } else {
      Element<T>::to_float(rows + q * job.k_len, job.k_len, scratch);
      row = scratch;
    }
    atpatch::accumulate_row(row, job.k_len, atpatch::row_stats(row, job.k_len), cols);
  }
  atpatch::finish_columns(cols, job.k_len);
}

// Phase 2: one batch item -> flagged columns (its heads' blocks are contiguous).
template <typename T>
void score_task(void* data, size_t item) {
  auto& job = *static_cast<Job<T>*>(data);
  const auto b = static_cast<int64_t>(item);
  job.flagged[b] = atpatch::score_columns(job.head_columns.data() + b * job.heads, job.heads, job.k_len,
                                          job.detector, job.flags + b * job.k_len);
}

// Phase 3: one (batch, head) block -> output rows.
template <typename T>
void patch_task(void* data, size_t block_index) {
  const auto& job = *static_cast<const Job<T>*>(data);
  const auto block = static_cast<int64_t>(block_index);
  const int64_t b = block / job.heads;
  const T* in = job.block_in(block);
  T* out = job.block_out(block);
  const size_t block_bytes = static_cast<size_t>(job.q_len * job.k_len) * sizeof(T);
  if (job.flagged[b] == 0) {
    // Nothing flagged for this item: the block is the input, bit for bit.
    if (out != in) std::memcpy(out, in, block_bytes);
    return;
  }
  const float* flags = job.flags + b * job.k_len;
  float* scratch = job.scratch(block);
  for (int64_t q = 0; q < job.q_len; ++q) {
    const T* row_in = in + q * job.k_len;
    T* row_out = out + q * job.k_len;
    bool changed;
    if constexpr (std::is_same_v<T, float>) {
      changed = atpatch::patch_row(row_in, job.k_len, flags, row_out);
    } else {
      Element<T>::to_float(row_in, job.k_len, scratch);
      changed = atpatch::patch_row(scratch, job.k_len, flags, scratch);
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

template <typename T>
struct AtPatchKernel {
  using Elem = T;
  static constexpr const char* kProvider = "CPUExecutionProvider";
  explicit AtPatchKernel(float threshold) : threshold_(threshold) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    return guarded([&] { return Compute(context); });
  }

 private:
  OrtStatusPtr Compute(OrtKernelContext* raw) const {
    Ort::KernelContext ctx(raw);
    Checked<T> c;
    if (OrtStatusPtr status = Check(ctx, threshold_, &c)) return status;
    if (c.total == 0) return nullptr;  // zero-size dims: the empty output is the answer
    const int64_t batch = c.batch, heads = c.heads, q_len = c.q_len, k_len = c.k_len;
    atpatch::DetectorView detector = c.detector;
    detector.b2 = c.b2[0];
    const std::vector<int64_t>& shape = c.shape;
    int64_t blocks = 0, work = 0, flag_count = 0;
    if (!checked_mul(batch, heads, &blocks) || !checked_mul(blocks, kBlockFloats * k_len, &work) ||
        !checked_mul(batch, k_len, &flag_count) ||
        static_cast<uint64_t>(work) > std::numeric_limits<size_t>::max() / sizeof(float)) {
      return make_status(ORT_INVALID_ARGUMENT, "attention shape " + shape_str(shape) + " is too large for the workspace");
    }

    std::vector<float> workspace(static_cast<size_t>(work));
    std::vector<float> flags(static_cast<size_t>(flag_count));
    Job<T> job{c.in,
               c.out,
               batch,
               heads,
               q_len,
               k_len,
               detector,
               workspace.data(),
               flags.data(),
               std::vector<int64_t>(static_cast<size_t>(batch), 0),
               {}};
    job.head_columns.reserve(static_cast<size_t>(blocks));
    for (int64_t block = 0; block < blocks; ++block) job.head_columns.push_back(job.columns(block));

    const bool inline_run = c.total < kInlineElements;
    if (OrtStatusPtr s = Parallel(raw, &features_task<T>, blocks, &job, inline_run)) return s;
    if (OrtStatusPtr s = Parallel(raw, &score_task<T>, batch, &job, inline_run)) return s;
    return Parallel(raw, &patch_task<T>, blocks, &job, inline_run);
  }

  // Below this many map entries the op's work is tens of microseconds, about what three pool
  // dispatches cost, so it runs on the calling thread (onnxruntime's own kernels make the same
  // cost-based choice). On an idle 2-core machine a 2-layer, 64-wide model ran at 1.15x with
  // either path; on a busy one, pool dispatches wait for a free core.
  static constexpr int64_t kInlineElements = int64_t{1} << 16;

  static OrtStatusPtr Parallel(OrtKernelContext* ctx, void (*fn)(void*, size_t), int64_t total, void* data,
                               bool inline_run) {
    if (inline_run) {
      for (int64_t i = 0; i < total; ++i) fn(data, static_cast<size_t>(i));
      return nullptr;
    }
    // num_batch 0: let onnxruntime's intra-op pool split the range as it likes.
    return Ort::GetApi().KernelContext_ParallelFor(ctx, fn, static_cast<size_t>(total), 0, data);
  }

  const float threshold_;  // read-only after construction: Compute runs concurrently
};

#if defined(ATPATCH_WITH_CUDA)
// The op on onnxruntime's CUDA provider: every input and the output are device memory (the
// default memory type of a CUDA custom op); the four kernels are enqueued on onnxruntime's
// compute stream and not waited for, as the provider's own kernels do.
template <typename T>
struct AtPatchCudaKernel {
  using Elem = T;
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  explicit AtPatchCudaKernel(float threshold) : threshold_(threshold) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    return guarded([&] { return Compute(context); });
  }

 private:
  OrtStatusPtr Compute(OrtKernelContext* raw) const {
    Ort::KernelContext ctx(raw);
    Checked<T> c;
    if (OrtStatusPtr status = Check(ctx, threshold_, &c)) return status;
    if (c.total == 0) return nullptr;
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
    p.heads = c.heads;
    p.q_len = c.q_len;
    p.k_len = c.k_len;
    p.w1 = c.detector.w1;
    p.b1 = c.detector.b1;
    p.w2 = c.detector.w2;
    p.b2 = c.b2;
    p.hidden = c.detector.hidden;
    p.threshold = threshold_;
    const std::string error = atpatch::cuda::run(p, stream);
    return error.empty() ? nullptr : make_status(ORT_FAIL, "CUDA kernel: " + error);
  }

  const float threshold_;
};
#endif

template <typename Kernel>
struct AtPatchOp : Ort::CustomOpBase<AtPatchOp<Kernel>, Kernel, /*WithStatus=*/true> {
  using T = typename Kernel::Elem;
  AtPatchOp() {
    this->start_ver_ = kVersion;
    this->end_ver_ = kVersion;
    // The output may reuse the attention buffer: then untouched rows cost nothing.
    OrtCustomOp::GetMayInplace = &MayInplace;
    OrtCustomOp::ReleaseMayInplace = &ReleaseMayInplace;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    float threshold = kThresholdDefault;
    if (OrtStatus* missing = api.KernelInfoGetAttribute_float(info, kThresholdAttr, &threshold)) {
      api.ReleaseStatus(missing);  // absent: the spec's default
      threshold = kThresholdDefault;
    }
    try {
      *kernel = new Kernel(threshold);
    } catch (const std::bad_alloc&) {
      return make_status(ORT_FAIL, "out of memory creating the kernel");
    }
    return nullptr;
  }

  const char* GetName() const { return kOpType; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? Element<T>::type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return Element<T>::type; }

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
    if ((*status = api.CreateCustomOpDomain(kDomain, &d))) return;
    if ((*status = api.CustomOpDomain_Add(d, &op_float))) return;
    if ((*status = api.CustomOpDomain_Add(d, &op_half))) return;
#if defined(ATPATCH_WITH_CUDA)
    if ((*status = api.CustomOpDomain_Add(d, &cuda_float))) return;
    if ((*status = api.CustomOpDomain_Add(d, &cuda_half))) return;
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
// atpatch.runtime.native reads to decide which sessions the library covers.
#if defined(ATPATCH_WITH_CUDA)
#define ATPATCH_PROVIDERS_JSON                                                             \
  "\"providers\": [\"CPUExecutionProvider\", \"CUDAExecutionProvider\"], \"cuda_runtime\": \"" \
  ATPATCH_CUDA_RUNTIME "\", \"cuda_architectures\": \"" ATPATCH_CUDA_ARCHITECTURES "\", "
#else
#define ATPATCH_PROVIDERS_JSON "\"providers\": [\"CPUExecutionProvider\"], "
#endif
static_assert(atpatch::kFeaturesPerHead == 3 && atpatch::kFeatureVersion == 2,
              "AtPatchOpsInfo spells out features_per_head and feature_version: update it");
ATPATCH_EXPORT const char* AtPatchOpsInfo() {
  return "{\"domain\": \"ai.atpatch\", \"op_type\": \"AtPatch\", \"version\": 1, "
         "\"inputs\": [\"attention\", \"w1\", \"b1\", \"w2\", \"b2\"], \"outputs\": [\"patched\"], "
         "\"attributes\": {\"threshold\": 0.0}, \"features_per_head\": 3, \"feature_version\": 2, "
         "\"feature_names\": [\"mass\", \"peak\", \"top\"], "
         "\"dtypes\": [\"float32\", \"float16\"], " ATPATCH_PROVIDERS_JSON
         "\"ort_api_version\": " ATPATCH_STR(ORT_API_VERSION) "}";
}

// Run an atpatch-patched ONNX model from C++ with the native AtPatch kernel registered.
//
//   run_patched MODEL.onnx LIBRARY INPUTS.txt OUTPUTS.txt
//
// LIBRARY is atpatch's custom-op library (libatpatch_ops.so; `python -c "from atpatch.runtime.native
// import library_path; print(library_path())"`), or "-" to run the op as the model's ONNX function.
// Tensors in INPUTS.txt / OUTPUTS.txt are whitespace-separated text, one after another:
//   NAME TYPE RANK DIM_0 ... DIM_{RANK-1} VALUE ...   (TYPE: float32, int64 or int32; values row-major)
// Floats are written with 9 significant digits, enough to read back the same float32.

#include <onnxruntime_cxx_api.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Tensor {
  std::string type;
  std::vector<int64_t> dims;
  std::vector<float> f32;
  std::vector<int64_t> i64;
  std::vector<int32_t> i32;
};

size_t element_count(const std::vector<int64_t>& dims) {
  return std::accumulate(dims.begin(), dims.end(), size_t{1}, std::multiplies<size_t>());
}

template <typename T>
void read_values(std::istream& in, size_t n, std::vector<T>& out, const std::string& name) {
  out.resize(n);
  for (auto& v : out) {
    if (!(in >> v)) throw std::runtime_error("input " + name + ": fewer values than its dims say");
  }
}

std::map<std::string, Tensor> read_tensors(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::map<std::string, Tensor> tensors;
  std::string name;
  while (in >> name) {
    Tensor t;
    size_t rank = 0;
    if (!(in >> t.type >> rank)) throw std::runtime_error("input " + name + ": expected TYPE RANK after the name");
    t.dims.resize(rank);
    for (auto& d : t.dims) {
      if (!(in >> d) || d < 0) throw std::runtime_error("input " + name + ": bad dimension");
    }
    const size_t n = element_count(t.dims);
    if (t.type == "float32") {
      read_values(in, n, t.f32, name);
    } else if (t.type == "int64") {
      read_values(in, n, t.i64, name);
    } else if (t.type == "int32") {
      read_values(in, n, t.i32, name);
    } else {
      throw std::runtime_error("input " + name + ": type " + t.type + " is not supported (float32, int64, int32)");
    }
    tensors.emplace(name, std::move(t));
  }
  return tensors;
}

Ort::Value as_value(Tensor& t, const Ort::MemoryInfo& memory) {
  // The values are borrowed, not copied: `t` outlives the run.
  if (t.type == "float32") return Ort::Value::CreateTensor<float>(memory, t.f32.data(), t.f32.size(), t.dims.data(), t.dims.size());
  if (t.type == "int64") return Ort::Value::CreateTensor<int64_t>(memory, t.i64.data(), t.i64.size(), t.dims.data(), t.dims.size());
  return Ort::Value::CreateTensor<int32_t>(memory, t.i32.data(), t.i32.size(), t.dims.data(), t.dims.size());
}

void write_tensor(std::FILE* out, const std::string& name, const Ort::Value& value) {
  const auto info = value.GetTensorTypeAndShapeInfo();
  const auto dims = info.GetShape();
  const size_t n = info.GetElementCount();
  const auto type = info.GetElementType();
  const char* type_name = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT   ? "float32"
                          : type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? "int64"
                                                                        : nullptr;
  if (type_name == nullptr) throw std::runtime_error("output " + name + ": only float32 and int64 outputs are written");
  std::fprintf(out, "%s %s %zu", name.c_str(), type_name, dims.size());
  for (int64_t d : dims) std::fprintf(out, " %lld", static_cast<long long>(d));
  std::fprintf(out, "\n");
  for (size_t i = 0; i < n; ++i) {
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      std::fprintf(out, "%.9g ", static_cast<double>(value.GetTensorData<float>()[i]));
    } else {
      std::fprintf(out, "%lld ", static_cast<long long>(value.GetTensorData<int64_t>()[i]));
    }
  }
  std::fprintf(out, "\n");
}

int run(const std::string& model, const std::string& library, const std::string& inputs_path,
        const std::string& outputs_path) {
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "atpatch-example");
  Ort::SessionOptions options;
  if (library != "-") {
    // Once registered, onnxruntime runs AtPatch with this kernel instead of the model's ONNX function.
    options.RegisterCustomOpsLibrary(library.c_str());
  }
  Ort::Session session(env, model.c_str(), options);

  auto tensors = read_tensors(inputs_path);
  Ort::AllocatorWithDefaultOptions allocator;
  const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<std::string> input_names, output_names;
  std::vector<Ort::Value> feeds;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    input_names.push_back(session.GetInputNameAllocated(i, allocator).get());
    auto found = tensors.find(input_names.back());
    if (found == tensors.end()) throw std::runtime_error(inputs_path + " has no input " + input_names.back());
    feeds.push_back(as_value(found->second, memory));
  }
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
  }
  std::vector<const char*> in_ptrs, out_ptrs;
  for (const auto& n : input_names) in_ptrs.push_back(n.c_str());
  for (const auto& n : output_names) out_ptrs.push_back(n.c_str());

  auto results = session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), feeds.data(), feeds.size(), out_ptrs.data(),
                             out_ptrs.size());

  std::FILE* out = std::fopen(outputs_path.c_str(), "w");
  if (out == nullptr) throw std::runtime_error("cannot write " + outputs_path);
  for (size_t i = 0; i < results.size(); ++i) write_tensor(out, output_names[i], results[i]);
  std::fclose(out);
  std::cout << "onnxruntime " << Ort::GetVersionString() << ", AtPatch "
            << (library == "-" ? "as the ONNX function" : "native kernel from " + library) << ": wrote "
            << results.size() << " output(s) to " << outputs_path << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.onnx LIBRARY|- INPUTS.txt OUTPUTS.txt\n";
    return 2;
  }
  try {
    return run(argv[1], argv[2], argv[3], argv[4]);
  } catch (const std::exception& err) {  // Ort::Exception included
    std::cerr << "run_patched: error: " << err.what() << "\n";
    return 1;
  }
}

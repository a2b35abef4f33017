// GPU self-test of the CUDA AtPatch kernel, without onnxruntime: runs cuda_kernel.cu's entry
// point (the one the CUDA custom op calls) on fresh random maps and compares it with the CPU
// kernel's arithmetic (core.cc, driven as custom_op.cc drives it), then times both.
//
//   atpatch_cuda_selftest [--cases N] [--seed S] [--no-big] [--small] [--no-bench] [--cpu-only]
//
// Checks, per case: |gpu - cpu| <= 1e-6 (float32) / 1e-3 (float16), the tolerances of
// tests/test_kernel.py; rows the spec leaves unchanged are the input bit for bit; the run in
// place (output == input, as onnxruntime may ask) gives the same. Cases cover batch 1, one
// query, k_len not a multiple of 16, padded keys, padded (all-zero) query rows, causal masks,
// and none / one / some / all columns flagged (the cut sits in a gap of the scores wider than
// 1e-3, as tests/maps.py does, so rounding cannot flip a flag).
// --cpu-only runs the case generator and the CPU side alone (for machines without a GPU).
// Exit status: 0 all passed, 1 a mismatch, 2 bad usage, 3 no usable CUDA device.
#if defined(ATPATCH_CUDA_EMULATION)
#include "cuda_emulation.h"  // the self-test on the CPU (see that file)
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core.h"
#include "cuda_kernel.h"

namespace {

struct Shape {
  int64_t b, h, q, k;
  int64_t size() const { return b * h * q * k; }
  std::string str() const {
    return std::to_string(b) + "x" + std::to_string(h) + "x" + std::to_string(q) + "x" + std::to_string(k);
  }
};

struct Detector {
  std::vector<float> w1, b1, w2;
  float b2 = 0.0f;
  int64_t hidden = 0;
  atpatch::DetectorView view() const { return {w1.data(), b1.data(), w2.data(), b2, hidden, 0.0f}; }
};

using Rng = std::mt19937_64;

double normal(Rng& rng) { return std::normal_distribution<double>(0.0, 1.0)(rng); }
double uniform(Rng& rng, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
int64_t integer(Rng& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi - 1)(rng); }

// tests/maps.py's random_map: a softmax of random scores, sometimes one column that soaks up
// attention, masked entries exactly 0. "padded_rows" also zeroes the last query rows of
// each item, as exporters that mask padded queries do.
std::vector<float> random_map(Rng& rng, const Shape& s, const std::string& mask) {
  std::vector<float> map(static_cast<size_t>(s.size()));
  const double scale = uniform(rng, 0.5, 4.0);
  const int64_t hot = s.k > 1 && uniform(rng, 0, 1) < 0.5 ? integer(rng, 0, s.k) : -1;
  const double hot_boost = uniform(rng, 2.0, 8.0);
  std::vector<double> row(static_cast<size_t>(s.k));
  for (int64_t b = 0; b < s.b; ++b) {
    const int64_t keys = mask == "padded" || mask == "padded_rows" ? s.k - integer(rng, 0, s.k) : s.k;
    const int64_t queries = mask == "padded_rows" ? s.q - integer(rng, 0, s.q) : s.q;
    for (int64_t h = 0; h < s.h; ++h) {
      for (int64_t q = 0; q < s.q; ++q) {
        float* out = map.data() + ((b * s.h + h) * s.q + q) * s.k;
        if (q >= queries) {
          std::fill(out, out + s.k, 0.0f);
          continue;
        }
        double top = -INFINITY;
        for (int64_t j = 0; j < s.k; ++j) {
          bool allowed = j < keys;
          if (mask == "causal") allowed = j == 0 || j <= q + (s.k - s.q);
          row[j] = allowed ? normal(rng) * scale + (j == hot ? hot_boost : 0.0) : -INFINITY;
          top = std::max(top, row[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < s.k; ++j) sum += (row[j] = std::exp(row[j] - top));
        for (int64_t j = 0; j < s.k; ++j) out[j] = static_cast<float>(row[j] / sum);
      }
    }
  }
  return map;
}

Detector random_detector(Rng& rng, int64_t heads) {
  Detector d;
  d.hidden = integer(rng, 0, 4) == 0 ? 32 : integer(rng, 1, 9);
  d.w1.resize(static_cast<size_t>(atpatch::kFeaturesPerHead * heads * d.hidden));
  d.b1.resize(static_cast<size_t>(d.hidden));
  d.w2.resize(static_cast<size_t>(d.hidden));
  for (float& x : d.w1) x = static_cast<float>(normal(rng));
  for (float& x : d.b1) x = static_cast<float>(normal(rng));
  for (float& x : d.w2) x = static_cast<float>(normal(rng));
  return d;
}

template <typename T>
float to_float(T v);
template <>
float to_float(float v) { return v; }
template <>
float to_float(__half v) { return __half2float(v); }
template <typename T>
T from_float(float v);
template <>
float from_float(float v) { return v; }
template <>
__half from_float(float v) { return __float2half_rn(v); }  // RNE, as Ort::Float16_t(float)

void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int64_t i = t; i < n; i += threads) fn(i);
    });
  }
  for (auto& th : pool) th.join();
}

// The CPU kernel as custom_op.cc runs it: phase 1 per block, phase 2 per item, phase 3 per
// block (float16 rows converted to float scratch, converted back only when changed).
// `changed` (optional) gets one byte per row: 1 when the row was patched.
template <typename T>
void cpu_atpatch(const T* in, T* out, const Shape& s, const atpatch::DetectorView& d, int threads,
                 std::vector<uint8_t>* changed, std::vector<int64_t>* flagged_per_item) {
  const int64_t blocks = s.b * s.h;
  std::vector<float> work(static_cast<size_t>(blocks * 5 * s.k));
  std::vector<atpatch::HeadColumns> cols(static_cast<size_t>(blocks));
  for (int64_t i = 0; i < blocks; ++i) {
    float* base = work.data() + i * 5 * s.k;
    cols[i] = {base, base + s.k, base + 2 * s.k, base + 3 * s.k};
  }
  auto scratch = [&](int64_t block) { return work.data() + (block * 5 + 4) * s.k; };
  parallel_for(blocks, threads, [&](int64_t block) {
    atpatch::clear_columns(cols[block], s.k);
    for (int64_t q = 0; q < s.q; ++q) {
      const T* src = in + (block * s.q + q) * s.k;
      float* row = scratch(block);
      for (int64_t j = 0; j < s.k; ++j) row[j] = to_float(src[j]);
      atpatch::accumulate_row(row, s.k, atpatch::row_stats(row, s.k), cols[block]);
    }
    atpatch::finish_columns(cols[block], s.k);
  });
  std::vector<float> flags(static_cast<size_t>(s.b * s.k));
  std::vector<int64_t> flagged(static_cast<size_t>(s.b));
  parallel_for(s.b, threads, [&](int64_t b) {
    flagged[b] = atpatch::score_columns(cols.data() + b * s.h, s.h, s.k, d, flags.data() + b * s.k);
  });
  if (changed) changed->assign(static_cast<size_t>(blocks * s.q), 0);
  parallel_for(blocks, threads, [&](int64_t block) {
    const int64_t b = block / s.h;
    for (int64_t q = 0; q < s.q; ++q) {
      const T* src = in + (block * s.q + q) * s.k;
      T* dst = out + (block * s.q + q) * s.k;
      bool patched = false;
      if (flagged[b] != 0) {
        float* row = scratch(block);
        for (int64_t j = 0; j < s.k; ++j) row[j] = to_float(src[j]);
        patched = atpatch::patch_row(row, s.k, flags.data() + b * s.k, row);
        if (patched) {
          for (int64_t j = 0; j < s.k; ++j) dst[j] = from_float<T>(row[j]);
        }
      }
      if (!patched && dst != src) std::memcpy(dst, src, static_cast<size_t>(s.k) * sizeof(T));
      if (changed) (*changed)[block * s.q + q] = patched ? 1 : 0;
    }
  });
  if (flagged_per_item) *flagged_per_item = flagged;
}

// The detector's scores per (item, column), computed from core.cc's features with the same MLP:
// only to place the threshold in a gap (tests/maps.py's with_flags).
// `features` (optional) gets core.cc's features in the CUDA kernel's layout [b, f * heads + h, j].
template <typename T>
std::vector<float> host_scores(const std::vector<T>& map, const Shape& s, const Detector& d,
                               std::vector<float>* features = nullptr) {
  const int64_t blocks = s.b * s.h;
  std::vector<float> work(static_cast<size_t>(blocks * 4 * s.k)), row(static_cast<size_t>(s.k));
  std::vector<atpatch::HeadColumns> cols(static_cast<size_t>(blocks));
  for (int64_t block = 0; block < blocks; ++block) {
    float* base = work.data() + block * 4 * s.k;
    cols[block] = {base, base + s.k, base + 2 * s.k, base + 3 * s.k};
    atpatch::clear_columns(cols[block], s.k);
    for (int64_t q = 0; q < s.q; ++q) {
      for (int64_t j = 0; j < s.k; ++j) row[j] = to_float(map[(block * s.q + q) * s.k + j]);
      atpatch::accumulate_row(row.data(), s.k, atpatch::row_stats(row.data(), s.k), cols[block]);
    }
    atpatch::finish_columns(cols[block], s.k);
  }
  if (features) {
    features->resize(static_cast<size_t>(s.b * atpatch::kFeaturesPerHead * s.h * s.k));
    for (int64_t b = 0; b < s.b; ++b) {
      for (int f = 0; f < atpatch::kFeaturesPerHead; ++f) {
        for (int64_t h = 0; h < s.h; ++h) {
          const auto& c = cols[b * s.h + h];
          const float* src = f == 0 ? c.mass : f == 1 ? c.peak : c.top;
          std::copy(src, src + s.k, features->data() + ((b * atpatch::kFeaturesPerHead + f) * s.h + h) * s.k);
        }
      }
    }
  }
  std::vector<float> scores(static_cast<size_t>(s.b * s.k));
  for (int64_t b = 0; b < s.b; ++b) {
    for (int64_t j = 0; j < s.k; ++j) {
      double score = 0.0;
      for (int64_t i = 0; i < d.hidden; ++i) {
        double dot = 0.0;
        for (int f = 0; f < atpatch::kFeaturesPerHead; ++f) {
          for (int64_t h = 0; h < s.h; ++h) {
            const auto& c = cols[b * s.h + h];
            const float v = f == 0 ? c.mass[j] : f == 1 ? c.peak[j] : c.top[j];
            dot += static_cast<double>(v) * d.w1[(f * s.h + h) * d.hidden + i];
          }
        }
        const float z = static_cast<float>(dot) + d.b1[i];
        score += static_cast<double>(z > 0.0f ? z : 0.0f) * d.w2[i];
      }
      scores[b * s.k + j] = static_cast<float>(score) + d.b2;
    }
  }
  return scores;
}

// b2 shifted so that `how` (none/one/some/all) columns score above 0; returns how many columns
// that flags, or -1 when the scores leave no gap wider than 1e-3 for one/some.
int64_t place_cut(const std::vector<float>& raw_scores, const std::string& how, Rng& rng, Detector* d) {
  std::vector<float> scores = raw_scores;
  std::sort(scores.begin(), scores.end(), std::greater<float>());
  scores.erase(std::unique(scores.begin(), scores.end()), scores.end());
  double cut;
  if (how == "none") {
    cut = scores.front() + 1.0;
  } else if (how == "all") {
    cut = scores.back() - 1.0;
  } else {
    std::vector<size_t> gaps;
    for (size_t i = 0; i + 1 < scores.size() && (how == "some" || i == 0); ++i) {
      if (static_cast<double>(scores[i]) - scores[i + 1] > 1e-3) gaps.push_back(i);
    }
    if (gaps.empty()) return -1;
    const size_t i = gaps[static_cast<size_t>(integer(rng, 0, static_cast<int64_t>(gaps.size())))];
    cut = (static_cast<double>(scores[i]) + scores[i + 1]) / 2;
  }
  d->b2 = static_cast<float>(d->b2 - cut);
  return std::count_if(raw_scores.begin(), raw_scores.end(), [&](float x) { return x > cut; });
}

#define CUDA_OK(call)                                                                                   \
  do {                                                                                                  \
    cudaError_t err_ = (call);                                                                          \
    if (err_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "selftest: %s failed: %s (%s)\n", #call, cudaGetErrorName(err_), cudaGetErrorString(err_)); \
      std::exit(1);                                                                                     \
    }                                                                                                   \
  } while (0)

template <typename T>
struct Device {
  T* ptr = nullptr;
  explicit Device(size_t n) { CUDA_OK(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T))); }
  ~Device() { cudaFree(ptr); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
};

// Runs the CUDA kernel on host data; `in_place` uses one buffer for input and output.
template <typename T>
std::vector<T> gpu_atpatch(const std::vector<T>& map, const Shape& s, const Detector& d, bool in_place,
                           std::vector<float>* features) {
  Device<T> in(map.size()), out(in_place ? 0 : map.size());
  const size_t feature_count = static_cast<size_t>(s.b * atpatch::kFeaturesPerHead * s.h * s.k);
  Device<float> feats(feature_count);
  Device<float> w1(d.w1.size()), b1(d.b1.size()), w2(d.w2.size()), b2(1);
  CUDA_OK(cudaMemcpy(in.ptr, map.data(), map.size() * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(w1.ptr, d.w1.data(), d.w1.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(b1.ptr, d.b1.data(), d.b1.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(w2.ptr, d.w2.data(), d.w2.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(b2.ptr, &d.b2, sizeof(float), cudaMemcpyHostToDevice));
  if (!in_place) CUDA_OK(cudaMemset(out.ptr, 0xff, map.size() * sizeof(T)));  // NaN: unwritten entries show
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  atpatch::cuda::Problem p{std::is_same<T, float>::value ? atpatch::cuda::Dtype::kFloat32
                                                         : atpatch::cuda::Dtype::kFloat16,
                           in.ptr, in_place ? in.ptr : out.ptr, s.b, s.h, s.q, s.k,
                           w1.ptr, b1.ptr, w2.ptr, b2.ptr, d.hidden, 0.0f, feats.ptr};
  const std::string error = atpatch::cuda::run(p, stream);
  if (!error.empty()) {
    std::fprintf(stderr, "selftest: atpatch::cuda::run failed on %s: %s\n", s.str().c_str(), error.c_str());
    std::exit(1);
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaStreamDestroy(stream));
  std::vector<T> result(map.size());
  CUDA_OK(cudaMemcpy(result.data(), in_place ? in.ptr : out.ptr, map.size() * sizeof(T), cudaMemcpyDeviceToHost));
  features->resize(feature_count);
  CUDA_OK(cudaMemcpy(features->data(), feats.ptr, feature_count * sizeof(float), cudaMemcpyDeviceToHost));
  return result;
}

struct Tally {
  int cases = 0, failures = 0;
  int64_t entries = 0, identical = 0, unchanged_rows = 0, patched_rows = 0;
  double max_diff = 0.0, max_feature_diff = 0.0;
};

bool bits_equal(const void* a, const void* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

// One case: CPU side always; GPU side unless cpu_only. Returns false on a failed check.
template <typename T>
bool run_case(Rng& rng, const Shape& s, const std::string& mask, std::string how, bool cpu_only, bool in_place,
              std::map<std::string, Tally>* tallies) {
  const std::vector<float> map32 = random_map(rng, s, mask);
  std::vector<T> map(map32.size());
  for (size_t i = 0; i < map.size(); ++i) map[i] = from_float<T>(map32[i]);
  Detector d = random_detector(rng, s.h);
  std::vector<float> cpu_features;
  const std::vector<float> scores = host_scores(map, s, d, &cpu_features);
  int64_t expected = place_cut(scores, how, rng, &d);
  if (expected < 0) {
    how = "none";
    expected = place_cut(scores, how, rng, &d);
  }
  const bool fp32 = std::is_same<T, float>::value;
  Tally& t = (*tallies)[std::string(fp32 ? "float32" : "float16") + " " + how];
  ++t.cases;
  auto fail = [&](const std::string& what) {
    std::fprintf(stderr, "FAIL %s %s mask=%s flagged=%s%s: %s\n", fp32 ? "float32" : "float16", s.str().c_str(),
                 mask.c_str(), how.c_str(), in_place ? " in-place" : "", what.c_str());
    ++t.failures;
    return false;
  };

  std::vector<T> cpu(map.size());
  std::vector<uint8_t> changed;
  std::vector<int64_t> flagged;
  cpu_atpatch(map.data(), cpu.data(), s, d.view(), 1, &changed, &flagged);
  // The harness's own checks: the cut flags what was asked, unchanged rows are the input.
  int64_t total_flagged = 0;
  for (int64_t f : flagged) total_flagged += f;
  const bool count_ok = how == "none"  ? expected == 0
                        : how == "all" ? expected == s.b * s.k
                                       : expected >= 1 && (how == "one" || expected < s.b * s.k);
  if (!count_ok || total_flagged != expected) {
    return fail("the CPU kernel flagged " + std::to_string(total_flagged) + " columns, the cut " +
                std::to_string(expected));
  }
  const size_t row_bytes = static_cast<size_t>(s.k) * sizeof(T);
  for (size_t r = 0; r < changed.size(); ++r) {
    if (!changed[r] && !bits_equal(&cpu[r * s.k], &map[r * s.k], row_bytes)) {
      return fail("CPU: unchanged row " + std::to_string(r) + " is not the input");
    }
    (changed[r] ? t.patched_rows : t.unchanged_rows) += 1;
  }
  t.entries += s.size();
  if (cpu_only) return true;

  std::vector<float> gpu_features;
  const std::vector<T> gpu = gpu_atpatch(map, s, d, in_place, &gpu_features);
  const double tolerance = fp32 ? 1e-6 : 1e-3;
  bool ok = true;
  // The features, before any threshold: relative 1e-6 (mass grows with the row length).
  for (size_t i = 0; i < gpu_features.size(); ++i) {
    const double c = cpu_features[i], diff = std::fabs(gpu_features[i] - c) / std::max(1.0, std::fabs(c));
    if (!(diff <= 1e-6)) {
      if (ok) fail("feature " + std::to_string(i) + ": gpu " + std::to_string(gpu_features[i]) + " vs cpu " +
                   std::to_string(c));
      ok = false;
    }
    if (diff > t.max_feature_diff) t.max_feature_diff = diff;
  }
  for (size_t i = 0; i < gpu.size(); ++i) {
    const float g = to_float(gpu[i]), c = to_float(cpu[i]);
    const double diff = std::fabs(static_cast<double>(g) - c);
    if (bits_equal(&gpu[i], &cpu[i], sizeof(T))) {
      ++t.identical;
    } else if (!(diff <= tolerance)) {  // also catches NaN
      if (ok) fail("entry " + std::to_string(i) + ": gpu " + std::to_string(g) + " vs cpu " + std::to_string(c));
      ok = false;
    }
    if (diff > t.max_diff) t.max_diff = diff;
  }
  for (size_t r = 0; ok && r < changed.size(); ++r) {
    if (!changed[r] && !bits_equal(&gpu[r * s.k], &map[r * s.k], row_bytes)) {
      ok = fail("GPU: row " + std::to_string(r) + " should be the input bit for bit");
    }
  }
  return ok;
}

Shape random_shape(Rng& rng, int i, bool small) {
  if (i < 4) return {1, 1, 1, 1 + i};  // every dimension 1 first
  if (i % 25 == 24 && !small) return {integer(rng, 1, 4), integer(rng, 1, 13), integer(rng, 32, 129), integer(rng, 32, 129)};
  if (i % 10 == 5) return {1, integer(rng, 1, 13), 1, integer(rng, 1, 200)};  // one query (decoding)
  return {integer(rng, 1, 4), integer(rng, 1, 5), integer(rng, 1, 10), integer(rng, 1, 40)};
}

const char* kMasks[] = {"none", "padded", "causal", "padded_rows"};
const char* kHows[] = {"none", "one", "some", "all"};

template <typename T>
bool run_cases(Rng& rng, int cases, bool big, bool small, bool cpu_only, std::map<std::string, Tally>* tallies) {
  bool ok = true;
  for (int i = 0; i < cases; ++i) {
    const Shape s = random_shape(rng, i, small);
    ok &= run_case<T>(rng, s, kMasks[i % 4], kHows[(i / 4) % 4], cpu_only, i % 2 == 1, tallies);
  }
  if (big) {
    const Shape shapes[] = {{4, 12, 384, 384}, {1, 12, 384, 384}, {2, 12, 256, 256},
                            {8, 4, 128, 96},   {2, 12, 1, 384},   {3, 2, 7, 1000}};
    const char* combos[][2] = {{"padded", "some"}, {"causal", "none"}, {"none", "one"}, {"padded_rows", "all"}};
    int n = 0;
    for (const Shape& s : shapes) {
      for (const auto& c : combos) {
        ++n;
        if (!std::is_same<T, float>::value && n % 2) continue;  // float16: half the big cases
        ok &= run_case<T>(rng, s, c[0], c[1], cpu_only, n % 3 == 0, tallies);
      }
    }
  }
  return ok;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename T>
void bench(Rng& rng, const Shape& s) {
  const std::vector<float> map32 = random_map(rng, s, "padded");
  std::vector<T> map(map32.size());
  for (size_t i = 0; i < map.size(); ++i) map[i] = from_float<T>(map32[i]);
  Detector d = random_detector(rng, s.h);
  const std::vector<float> scores = host_scores(map, s, d);
  if (place_cut(scores, "some", rng, &d) < 0) place_cut(scores, "none", rng, &d);
  std::vector<T> out(map.size());
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto cpu_ms = [&](int n_threads, int reps) {
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      cpu_atpatch(map.data(), out.data(), s, d.view(), n_threads, nullptr, nullptr);
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return median(times);
  };
  const double cpu1 = cpu_ms(1, 3), cpun = cpu_ms(threads, 5);

  Device<T> in(map.size()), dev_out(map.size());
  Device<float> w1(d.w1.size()), b1(d.b1.size()), w2(d.w2.size()), b2(1);
  CUDA_OK(cudaMemcpy(in.ptr, map.data(), map.size() * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(w1.ptr, d.w1.data(), d.w1.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(b1.ptr, d.b1.data(), d.b1.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(w2.ptr, d.w2.data(), d.w2.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(b2.ptr, &d.b2, sizeof(float), cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  atpatch::cuda::Problem p{std::is_same<T, float>::value ? atpatch::cuda::Dtype::kFloat32
                                                         : atpatch::cuda::Dtype::kFloat16,
                           in.ptr, dev_out.ptr, s.b, s.h, s.q, s.k, w1.ptr, b1.ptr, w2.ptr, b2.ptr, d.hidden, 0.0f, nullptr};
  std::vector<double> times;
  for (int r = 0; r < 25; ++r) {
    CUDA_OK(cudaEventRecord(start, stream));
    const std::string error = atpatch::cuda::run(p, stream);
    if (!error.empty()) {
      std::fprintf(stderr, "selftest: benchmark run failed: %s\n", error.c_str());
      std::exit(1);
    }
    CUDA_OK(cudaEventRecord(stop, stream));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    if (r >= 5) times.push_back(ms);  // the first runs warm up the allocator's pool
  }
  const double gpu = median(times);
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(stop));
  CUDA_OK(cudaStreamDestroy(stream));
  const double gbytes = static_cast<double>(map.size() * sizeof(T)) / 1e9;
  std::printf("%-8s %-14s %10.2f %12.2f (%2d thr) %10.3f %9.0fx %9.0fx %10.0f\n",
              std::is_same<T, float>::value ? "float32" : "float16", s.str().c_str(), cpu1, cpun, threads, gpu,
              cpu1 / gpu, cpun / gpu, gbytes / (gpu / 1e3));
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines in order with stderr when piped into a log
  int cases = 600;
  bool big = true, small = false, do_bench = true, cpu_only = false;
  uint64_t seed = std::random_device{}() ^ (static_cast<uint64_t>(std::random_device{}()) << 32);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--cases" && i + 1 < argc) {
      cases = std::atoi(argv[++i]);
    } else if (a == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (a == "--no-big") {
      big = false;
    } else if (a == "--small") {  // no big maps, no medium ones either (for slow runs: emulation, sanitizers)
      big = false;
      small = true;
    } else if (a == "--no-bench") {
      do_bench = false;
    } else if (a == "--cpu-only") {
      cpu_only = true;
    } else {
      std::fprintf(stderr, "usage: %s [--cases N] [--seed S] [--no-big] [--small] [--no-bench] [--cpu-only]\n", argv[0]);
      return 2;
    }
  }
  std::printf("atpatch CUDA self-test: seed %llu (rerun with --seed to reproduce), %d float32 + %d float16 cases%s\n",
              static_cast<unsigned long long>(seed), cases, cases / 2, big ? " + big maps" : "");
  if (!cpu_only) {
    int devices = 0;
    const cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
      std::fprintf(stderr,
                   "selftest: no usable CUDA device (%s: %s), so the GPU side cannot run on this machine. "
                   "Run it on a GPU machine, or pass --cpu-only to check the case generator and the CPU side.\n",
                   err != cudaSuccess ? cudaGetErrorName(err) : "cudaGetDeviceCount",
                   err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
      return 3;
    }
    cudaDeviceProp prop{};
    CUDA_OK(cudaGetDeviceProperties(&prop, 0));
    int driver = 0;
    cudaDriverGetVersion(&driver);
    std::printf("device 0: %s, sm_%d%d, driver API %d, runtime %d\n", prop.name, prop.major, prop.minor, driver,
                CUDART_VERSION);
  } else {
    std::printf("--cpu-only: the GPU side is skipped\n");
  }

  Rng rng(seed);
  std::map<std::string, Tally> tallies;
  const auto t0 = std::chrono::steady_clock::now();
  bool ok = run_cases<float>(rng, cases, big, small, cpu_only, &tallies);
  ok &= run_cases<__half>(rng, cases / 2, big, small, cpu_only, &tallies);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::printf("\n%-16s %6s %12s %10s %10s %13s %12s %12s %7s\n", "dtype flagged", "cases", "entries", "unchanged",
              "patched", "max|gpu-cpu|", "bit-equal %", "feature rel", "failed");
  int failures = 0;
  for (const auto& [key, t] : tallies) {
    failures += t.failures;
    if (cpu_only) {
      std::printf("%-16s %6d %12lld %10lld %10lld %13s %12s %12s %7d\n", key.c_str(), t.cases,
                  static_cast<long long>(t.entries), static_cast<long long>(t.unchanged_rows),
                  static_cast<long long>(t.patched_rows), "-", "-", "-", t.failures);
    } else {
      std::printf("%-16s %6d %12lld %10lld %10lld %13.3g %12.4f %12.3g %7d\n", key.c_str(), t.cases,
                  static_cast<long long>(t.entries), static_cast<long long>(t.unchanged_rows),
                  static_cast<long long>(t.patched_rows), t.max_diff,
                  t.entries ? 100.0 * static_cast<double>(t.identical) / static_cast<double>(t.entries) : 100.0,
                  t.max_feature_diff, t.failures);
    }
  }
  std::printf("tolerance: float32 1e-6, float16 1e-3 (absolute); unchanged rows bit-identical; "
              "features 1e-6 (relative); %.1f s\n", seconds);
  // Every category must have been exercised, or the run proves less than it says.
  for (const char* dtype : {"float32", "float16"}) {
    for (const char* how : kHows) {
      const auto it = tallies.find(std::string(dtype) + " " + how);
      if (it == tallies.end() || it->second.cases == 0) {
        std::fprintf(stderr, "FAIL: no %s case with %s flagged; raise --cases\n", dtype, how);
        ok = false;
      }
    }
  }

  if (ok && do_bench && !cpu_only) {
    std::printf("\ntiming (median; CPU = core.cc as custom_op.cc drives it; GPU = cuda_kernel.cu on one stream,\n"
                "device-resident data, transfers not included)\n");
    std::printf("%-8s %-14s %10s %21s %10s %10s %10s %10s\n", "dtype", "shape", "cpu1 ms", "cpuN ms", "gpu ms",
                "vs cpu1", "vs cpuN", "map GB/s");
    bench<float>(rng, {8, 12, 512, 512});
    bench<__half>(rng, {8, 12, 512, 512});
  }
  if (!ok || failures) {
    std::printf("\nRESULT: FAILED\n");
    return 1;
  }
  std::printf("\nRESULT: PASSED\n");
  return 0;
}

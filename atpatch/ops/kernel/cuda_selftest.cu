// GPU self-test of the CUDA AtPatch kernel, without onnxruntime: runs cuda_kernel.cu's entry
// point (the one the CUDA custom op calls) on fresh random maps and compares it with the CPU
// kernel's arithmetic (core.cc, driven as custom_op.cc drives it), then times both. Then the
// fused op's entry point (cuda_fused.h) on random attention (cuda_fused_selftest.h).
//
//   atpatch_cuda_selftest [--cases N] [--seed S] [--no-big] [--small] [--no-bench] [--cpu-only]
//
// Checks, per case: |gpu - cpu| <= 1e-6 (float32) / 1e-3 (float16), the tolerances of
// tests/test_kernel.py; the `flags` output equal; rows the spec leaves unchanged are the input
// bit for bit; the run in place (output == input, as onnxruntime may ask) gives the same. Cases
// cover batch 1, one query, more queries than keys, k_len not a multiple of 16, padded keys
// (BERT-style: padding query rows still attend the real keys), padded all-zero query rows,
// causal masks, none / one / some / all columns flagged (the cut sits in a gap of the scores
// wider than 1e-3, as tests/maps.py does, so rounding cannot flip a flag), random `forced` masks
// of every broadcast shape, and op v1 (every query row counted, no forced, no flags). Op v2's
// features are all six (v1's the first three); a quarter of the v2 detectors read only the
// own-row ones, and a targeted case (own_row_case) checks that those alone flag what they should.
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
#include "cuda_selftest_cases.h"

namespace {

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
std::vector<T> gpu_atpatch(const std::vector<T>& map, const Shape& s, const Detector& d, const Variant& v,
                           bool in_place, std::vector<float>* features, std::vector<uint8_t>* flags,
                           std::vector<float>* scores = nullptr) {
  Device<T> in(map.size()), out(in_place ? 0 : map.size());
  Device<uint8_t> forced(v.forced.size()), flags_dev(static_cast<size_t>(s.b * s.k));
  if (!v.forced.empty()) CUDA_OK(cudaMemcpy(forced.ptr, v.forced.data(), v.forced.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(flags_dev.ptr, 0xee, static_cast<size_t>(s.b * s.k)));  // unwritten flags show
  Device<float> scores_dev(static_cast<size_t>(s.b * s.k));
  CUDA_OK(cudaMemset(scores_dev.ptr, 0xff, static_cast<size_t>(s.b * s.k) * sizeof(float)));  // NaN: unwritten shows
  const size_t feature_count = static_cast<size_t>(s.b * d.features_per_head * s.h * s.k);
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
                           w1.ptr, b1.ptr, w2.ptr, b2.ptr, d.hidden, 0.0f};
  p.features_out = feats.ptr;
  p.count_every_row = v.v1;
  p.forced = v.forced.empty() ? nullptr : forced.ptr;
  p.forced_batch_stride = v.batch_stride();
  p.forced_key_stride = v.key_stride();
  p.flags = v.v1 ? nullptr : flags_dev.ptr;
  p.scores = v.v1 || scores == nullptr ? nullptr : scores_dev.ptr;
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
  flags->assign(static_cast<size_t>(s.b * s.k), 0);
  if (!v.v1) CUDA_OK(cudaMemcpy(flags->data(), flags_dev.ptr, flags->size(), cudaMemcpyDeviceToHost));
  if (scores != nullptr && !v.v1) {
    scores->resize(static_cast<size_t>(s.b * s.k));
    CUDA_OK(cudaMemcpy(scores->data(), scores_dev.ptr, scores->size() * sizeof(float), cudaMemcpyDeviceToHost));
  }
  return result;
}

struct Tally {
  int cases = 0, failures = 0;
  int64_t entries = 0, identical = 0, unchanged_rows = 0, patched_rows = 0;
  double max_diff = 0.0, max_feature_diff = 0.0;
};

// What the cases exercised beyond dtype x flagged, so that a run proves what it says.
struct Coverage {
  std::map<std::string, int> counts;  // "forced [B,K]", ..., "op v1", "padding query rows", ...
  void add(const std::string& what) { ++counts[what]; }
};

bool bits_equal(const void* a, const void* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

}  // namespace

// The fused op's cases use CUDA_OK, Coverage and the case helpers above.
#include "cuda_fused_selftest.h"

namespace {

// Variant `kind` (0-5): op v1; v2 with nothing forced; v2 with forced of shape [B,K], [B,1],
// [1,K] or [1,1], each position forced with probability 0.2.
constexpr int kVariants = 6;
Variant make_variant(Rng& rng, const Shape& s, int kind, Coverage* coverage) {
  Variant v;
  if (kind == 0) {
    v.v1 = true;
    coverage->add("op v1");
    return v;
  }
  if (kind == 1) return v;
  static const char* kNames[] = {"forced [B,K]", "forced [B,1]", "forced [1,K]", "forced [1,1]"};
  const int shape = kind - 2;
  v.fb = shape == 0 || shape == 1 ? s.b : 1;
  v.fk = shape == 0 || shape == 2 ? s.k : 1;
  v.forced.resize(static_cast<size_t>(v.fb * v.fk));
  for (uint8_t& x : v.forced) x = uniform(rng, 0, 1) < 0.2 ? 1 : 0;
  coverage->add(kNames[shape]);
  return v;
}

// One case: CPU side always; GPU side unless cpu_only. Returns false on a failed check.
template <typename T>
bool run_case(Rng& rng, const Shape& s, const std::string& mask, std::string how, int variant, bool cpu_only,
              bool in_place, std::map<std::string, Tally>* tallies, Coverage* coverage) {
  const std::vector<float> map32 = random_map(rng, s, mask);
  std::vector<T> map(map32.size());
  for (size_t i = 0; i < map.size(); ++i) map[i] = from_float<T>(map32[i]);
  const Variant v = make_variant(rng, s, variant, coverage);
  Detector d = random_detector(rng, s.h, v.v1);
  if (!v.v1 && uniform(rng, 0, 1) < 0.25) {
    // A detector that reads only the own-row features (self, opeak, ofocus): their flags.
    std::fill(d.w1.begin(), d.w1.begin() + atpatch::kFeaturesPerHeadV1 * s.h * d.hidden, 0.0f);
    coverage->add("own-row-only detector");
  }
  std::vector<float> cpu_features;
  const std::vector<float> scores = host_scores(map, s, d, v.v1, &cpu_features);
  int64_t expected = place_cut(scores, how, rng, &d);
  if (expected < 0) {
    how = "none";
    expected = place_cut(scores, how, rng, &d);
  }
  const bool fp32 = std::is_same<T, float>::value;
  Tally& t = (*tallies)[std::string(fp32 ? "float32" : "float16") + " " + how];
  ++t.cases;
  auto fail = [&](const std::string& what) {
    std::fprintf(stderr, "FAIL %s %s mask=%s flagged=%s%s%s: %s\n", fp32 ? "float32" : "float16", s.str().c_str(),
                 mask.c_str(), how.c_str(), v.v1 ? " v1" : v.forced.empty() ? "" : " forced",
                 in_place ? " in-place" : "", what.c_str());
    ++t.failures;
    return false;
  };
  int64_t attended = 0, padding_rows = 0;
  for (float x : scores) attended += std::isnan(x) ? 0 : 1;
  for (int64_t r = 0; !v.v1 && r < s.b * s.h * s.q; ++r) {
    const T* src = map.data() + r * s.k;
    padding_rows += atpatch::counts_row(false, r % s.q, s.q, s.k, [src](int64_t j) { return to_float(src[j]); }) ? 0 : 1;
  }
  if (padding_rows) coverage->add("padding query rows");
  if (s.q > s.k) coverage->add("q_len > k_len");

  std::vector<T> cpu(map.size());
  std::vector<uint8_t> changed, cpu_flags;
  std::vector<int64_t> patched;
  std::vector<float> cpu_scores;
  cpu_atpatch(map.data(), cpu.data(), s, d.view(), v, 1, &changed, &patched, v.v1 ? nullptr : &cpu_flags,
              v.v1 ? nullptr : &cpu_scores);
  // The harness's own checks: the cut flags what was asked, unchanged rows are the input.
  int64_t total_flagged = 0, total_patched = 0;
  for (uint8_t f : cpu_flags) total_flagged += f;
  for (int64_t f : patched) total_patched += f;
  if (v.v1) total_flagged = total_patched;  // v1 has no flags output: P is its flags
  const bool count_ok = how == "none"  ? expected == 0
                        : how == "all" ? expected == attended
                                       : expected >= 1 && (how == "one" || expected < attended);
  const bool p_ok = v.forced.empty() ? total_patched == total_flagged : total_patched >= total_flagged;
  if (!count_ok || total_flagged != expected || !p_ok) {
    return fail("the CPU kernel flagged " + std::to_string(total_flagged) + " columns (" +
                std::to_string(total_patched) + " patched), the cut " + std::to_string(expected));
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
  std::vector<uint8_t> gpu_flags;
  std::vector<float> gpu_scores;
  const std::vector<T> gpu = gpu_atpatch(map, s, d, v, in_place, &gpu_features, &gpu_flags, &gpu_scores);
  const double tolerance = fp32 ? 1e-6 : 1e-3;
  bool ok = true;
  if (!v.v1 && gpu_flags != cpu_flags) ok = fail("the flags output differs from the CPU kernel's");
  // Same dots in the same order: the scores are meant to be bit-identical (-inf on unattended columns).
  if (!v.v1 && !bits_equal(gpu_scores.data(), cpu_scores.data(), cpu_scores.size() * sizeof(float))) {
    ok = fail("the scores output differs from the CPU kernel's");
  }
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

// Targeted: a map where only the own-row features tell the columns apart, and a detector that
// reads `self` alone (tests/maps.py's own_row_map, and test_kernel.py's test on it). Query row o
// of head h gives its i-th cache key c = 0.05 and its keys 2 + k the values p[(k + o + h) % 7] *
// 0.9 (p = (1..7) / 28, reversed in item 1): every query key receives the same values, each row
// has the same ones, so mass, peak, top, opeak and ofocus are equal across the query keys (and
// the cache keys have no own row); self, p[(2 o + h) % 7] * 0.9 * 9 at key 2 + o, is not. The
// flags must be exactly the keys whose self of head 0 is above the cut, on the CPU and the device.
template <typename T>
bool own_row_case(bool cpu_only, Coverage* coverage) {
  const Shape s{2, 2, 7, 9};
  const int64_t cache = s.k - s.q;
  const float c = 0.05f, rest = 1.0f - static_cast<float>(cache) * c;
  auto p = [&](int64_t b, int64_t i) { return static_cast<float>(b == 0 ? i + 1 : s.q - i) / 28.0f; };
  std::vector<T> map(static_cast<size_t>(s.size()));
  for (int64_t b = 0; b < s.b; ++b) {
    for (int64_t h = 0; h < s.h; ++h) {
      for (int64_t o = 0; o < s.q; ++o) {
        T* row = map.data() + ((b * s.h + h) * s.q + o) * s.k;
        for (int64_t j = 0; j < s.k; ++j) {
          row[j] = from_float<T>(j < cache ? c : p(b, (j - cache + o + h) % s.q) * rest);
        }
      }
    }
  }
  Detector d;
  d.hidden = 1;
  d.w1.assign(static_cast<size_t>(atpatch::kFeaturesPerHead * s.h), 0.0f);
  d.w1[3 * s.h + 0] = 1.0f;  // self of head 0
  d.b1 = {0.0f};
  d.w2 = {1.0f};
  const float cut = 1.0f;
  d.b2 = -cut;
  std::vector<uint8_t> expected(static_cast<size_t>(s.b * s.k), 0);
  int64_t flagged = 0;
  for (int64_t b = 0; b < s.b; ++b) {
    for (int64_t o = 0; o < s.q; ++o) {
      const double self = static_cast<double>(p(b, (2 * o) % s.q)) * rest * static_cast<double>(s.k);
      expected[b * s.k + cache + o] = self > cut ? 1 : 0;
      flagged += expected[b * s.k + cache + o];
    }
  }
  const bool fp32 = std::is_same<T, float>::value;
  auto fail = [&](const char* who, const std::vector<uint8_t>& got) {
    std::string text;
    for (uint8_t x : got) text += x ? '1' : '0';
    std::fprintf(stderr, "FAIL own-row case %s (%s): flags %s\n", fp32 ? "float32" : "float16", who, text.c_str());
    return false;
  };
  if (flagged == 0 || flagged == s.b * s.q) return fail("the case itself flags none or all", expected);
  const Variant v;  // op v2, nothing forced
  std::vector<T> out(map.size());
  std::vector<uint8_t> cpu_flags;
  cpu_atpatch(map.data(), out.data(), s, d.view(), v, 1, nullptr, nullptr, &cpu_flags);
  if (cpu_flags != expected) return fail("CPU", cpu_flags);
  if (!cpu_only) {
    std::vector<float> features;
    std::vector<uint8_t> gpu_flags;
    const std::vector<T> gpu = gpu_atpatch(map, s, d, v, false, &features, &gpu_flags);
    if (gpu_flags != expected) return fail("GPU", gpu_flags);
    for (size_t i = 0; i < gpu.size(); ++i) {
      if (!(std::fabs(static_cast<double>(to_float(gpu[i])) - to_float(out[i])) <= (fp32 ? 1e-6 : 1e-3))) {
        return fail("GPU output differs from the CPU's", gpu_flags);
      }
    }
  }
  std::string text;
  for (int64_t b = 0; b < s.b; ++b) {
    text += b ? " " : "";
    for (int64_t j = 0; j < s.k; ++j) text += expected[b * s.k + j] ? '1' : '0';
  }
  std::printf("own-row case %s: flags %s (%s)\n", fp32 ? "float32" : "float16", text.c_str(),
              cpu_only ? "CPU" : "CPU and GPU");
  coverage->add("own-row case");
  return true;
}

// The CPU kernel's float32 phase 1 takes rows four at a time (row_stats_group, accumulate_rows); the
// reference CPU side above takes them one by one. Both must give the same bits: random rows with
// masked (0) entries and ties, every length from 1 to 150 keys, accumulated onto random sums.
bool grouped_rows_case(Rng& rng) {
  constexpr int kGroup = atpatch::kRowGroup;
  int64_t checked = 0;
  for (int64_t k = 1; k <= 150; ++k) {
    std::vector<float> rows(static_cast<size_t>(kGroup * k)), one(static_cast<size_t>(7 * k)), four(one.size());
    for (float& x : rows) x = uniform(rng, 0, 1) < 0.2 ? 0.0f : static_cast<float>(uniform(rng, 0, 1) / k);
    if (k > 2) rows[1] = rows[2];  // a tie for the row maximum
    for (size_t i = 0; i < one.size(); ++i) one[i] = four[i] = static_cast<float>(uniform(rng, 0, 3));
    const float* group[kGroup];
    atpatch::RowStats singles[kGroup], grouped[kGroup];
    for (int r = 0; r < kGroup; ++r) {
      group[r] = rows.data() + r * k;
      singles[r] = atpatch::row_stats(group[r], k);
      atpatch::accumulate_row(group[r], k, singles[r], columns_at(one.data(), k, false));
    }
    atpatch::row_stats_group(group, k, grouped);
    atpatch::accumulate_rows(group, grouped, columns_at(four.data(), k, false), k);
    const size_t sums = static_cast<size_t>(4 * k) * sizeof(float);  // mass, peak, top, rows
    if (std::memcmp(singles, grouped, sizeof(singles)) != 0 || std::memcmp(one.data(), four.data(), sums) != 0) {
      std::fprintf(stderr, "FAIL grouped rows at k = %lld: not bit-identical to one row at a time\n",
                   static_cast<long long>(k));
      return false;
    }
    checked += kGroup;
  }
  std::printf("grouped rows: %lld rows bit-identical to one at a time\n", static_cast<long long>(checked));
  return true;
}

Shape random_shape(Rng& rng, int i, bool small) {
  if (i < 4) return {1, 1, 1, 1 + i};  // every dimension 1 first
  if (i % 25 == 24 && !small) return {integer(rng, 1, 4), integer(rng, 1, 13), integer(rng, 32, 129), integer(rng, 32, 129)};
  if (i % 10 == 5) return {1, integer(rng, 1, 13), 1, integer(rng, 1, 200)};  // one query (decoding)
  if (i % 10 == 7) return {integer(rng, 1, 4), integer(rng, 1, 5), integer(rng, 5, 12), integer(rng, 1, 5)};  // q > k
  return {integer(rng, 1, 4), integer(rng, 1, 5), integer(rng, 1, 10), integer(rng, 1, 40)};
}

const char* kMasks[] = {"none", "padded", "causal", "padded_rows"};
const char* kHows[] = {"none", "one", "some", "all"};

template <typename T>
bool run_cases(Rng& rng, int cases, bool big, bool small, bool cpu_only, std::map<std::string, Tally>* tallies,
               Coverage* coverage) {
  bool ok = true;
  for (int i = 0; i < cases; ++i) {
    const Shape s = random_shape(rng, i, small);
    // (i + i / 4) % kVariants: every variant within 16 cases, with every mask.
    ok &= run_case<T>(rng, s, kMasks[i % 4], kHows[(i / 4) % 4], (i + i / 4) % kVariants, cpu_only, i % 2 == 1,
                      tallies, coverage);
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
        ok &= run_case<T>(rng, s, c[0], c[1], static_cast<int>(integer(rng, 0, kVariants)), cpu_only, n % 3 == 0,
                          tallies, coverage);
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
  Detector d = random_detector(rng, s.h, false);
  const std::vector<float> scores = host_scores(map, s, d, false);
  if (place_cut(scores, "some", rng, &d) < 0) place_cut(scores, "none", rng, &d);
  Variant v;  // v2, nothing forced: the detector's flags alone
  std::vector<uint8_t> flags;
  std::vector<T> out(map.size());
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto cpu_ms = [&](int n_threads, int reps) {
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      cpu_atpatch(map.data(), out.data(), s, d.view(), v, n_threads, nullptr, nullptr, &flags);
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
  Device<uint8_t> dev_flags(static_cast<size_t>(s.b * s.k));
  atpatch::cuda::Problem p{std::is_same<T, float>::value ? atpatch::cuda::Dtype::kFloat32
                                                         : atpatch::cuda::Dtype::kFloat16,
                           in.ptr, dev_out.ptr, s.b, s.h, s.q, s.k, w1.ptr, b1.ptr, w2.ptr, b2.ptr, d.hidden, 0.0f};
  p.flags = dev_flags.ptr;
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
  Coverage coverage;
  const auto t0 = std::chrono::steady_clock::now();
  bool ok = run_cases<float>(rng, cases, big, small, cpu_only, &tallies, &coverage);
  ok &= run_cases<__half>(rng, cases / 2, big, small, cpu_only, &tallies, &coverage);
  ok &= own_row_case<float>(cpu_only, &coverage);
  ok &= own_row_case<__half>(cpu_only, &coverage);
  ok &= grouped_rows_case(rng);
  ok &= fused_cases(rng, std::max(8, cases / 4), cpu_only, &coverage);
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
  std::printf("coverage:");
  for (const auto& [what, n] : coverage.counts) std::printf(" %s %d;", what.c_str(), n);
  std::printf("\n");
  // Every category must have been exercised, or the run proves less than it says.
  for (const char* what : {"forced [B,K]", "forced [B,1]", "forced [1,K]", "forced [1,1]", "op v1",
                           "own-row-only detector", "own-row case", "padding query rows", "q_len > k_len",
                           "fused none bias", "fused padding bias", "fused causal bias", "fused random bias",
                           "fused broadcast", "fused some flagged", "fused all flagged"}) {
    if (coverage.counts[what] == 0) {
      std::fprintf(stderr, "FAIL: no case with %s; raise --cases\n", what);
      ok = false;
    }
  }
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

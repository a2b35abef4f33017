// The self-test's AtPatchAttention cases (cuda_fused.h), for cuda_selftest.cu only (one translation
// unit, hence the unnamed namespace): random query, keys, values, bias (none, padding, causal,
// random) and broadcast layouts; the host forms the map as the device does (the depth summed in
// order, then scale and bias, the softmax's max and sum combined as a warp's xor butterfly does),
// patches it with core.cc (cpu_atpatch) and weighs the values; the device must give the same flags,
// the output within 1e-5 and the scores within 1e-5 relative. On the CPU emulation the two maps
// are the same; on a GPU expf may differ by an ulp or two. A case whose map has a row with two
// largest entries within 1e-5 (relative) is redrawn: which column is "top" there depends on rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda_fused.h"
#include "cuda_selftest_cases.h"

namespace {

struct FusedCase {
  Shape s;
  int64_t depth = 0, width = 0;
  bool shared_keys = false, shared_values = false;  // key_t batch 1, values heads 1
  std::string bias_kind;
  std::vector<float> query, key_t, value, bias;
  int64_t bias_strides[4] = {};
  float scale = 1.0f;
};

FusedCase random_fused_case(Rng& rng, int index) {
  static const char* kBias[] = {"none", "padding", "causal", "random"};
  FusedCase c;
  const int64_t k = integer(rng, 1, 40);
  c.s = {integer(rng, 1, 4), integer(rng, 1, 5), index % 3 == 0 ? integer(rng, 1, k + 1) : k, k};
  c.depth = integer(rng, 0, 20);
  c.width = integer(rng, 1, 20);
  c.shared_keys = index % 4 == 1;
  c.shared_values = index % 4 == 2;
  c.bias_kind = kBias[index % 4];
  c.scale = static_cast<float>(uniform(rng, 0.1, 1.0));
  const Shape& s = c.s;
  auto fill = [&](std::vector<float>* v, int64_t n, double sd) {
    v->resize(static_cast<size_t>(n));
    for (float& x : *v) x = static_cast<float>(sd * normal(rng));
  };
  fill(&c.query, s.b * s.h * s.q * c.depth, 1.5);
  fill(&c.key_t, (c.shared_keys ? 1 : s.b) * s.h * c.depth * s.k, 1.0);
  fill(&c.value, s.b * (c.shared_values ? 1 : s.h) * s.k * c.width, 1.0);
  const float masked = -3.4028234663852886e38f;  // what Hugging Face adds for a masked key
  if (c.bias_kind == "none") {
    c.bias = {0.0f};
  } else if (c.bias_kind == "padding") {  // [b, 1, 1, k]
    c.bias.assign(static_cast<size_t>(s.b * s.k), 0.0f);
    for (int64_t b = 0; b < s.b; ++b) {
      for (int64_t j = integer(rng, 1, s.k + 1); j < s.k; ++j) c.bias[b * s.k + j] = masked;
    }
    c.bias_strides[0] = s.k;
    c.bias_strides[3] = 1;
  } else if (c.bias_kind == "causal") {  // [1, 1, q, k]: the last q keys are the queries'
    c.bias.assign(static_cast<size_t>(s.q * s.k), 0.0f);
    for (int64_t q = 0; q < s.q; ++q) {
      for (int64_t j = s.k - s.q + q + 1; j < s.k; ++j) c.bias[q * s.k + j] = masked;
    }
    c.bias_strides[2] = s.k;
    c.bias_strides[3] = 1;
  } else {  // [b, h, q, k]
    fill(&c.bias, s.size(), 2.0);
    c.bias_strides[0] = s.h * s.q * s.k;
    c.bias_strides[1] = s.q * s.k;
    c.bias_strides[2] = s.k;
    c.bias_strides[3] = 1;
  }
  return c;
}

// The map as map_kernel forms it, or an empty vector when a row has a near tie at its top.
std::vector<float> host_map(const FusedCase& c) {
  const Shape& s = c.s;
  std::vector<float> map(static_cast<size_t>(s.size()));
  for (int64_t row = 0; row < s.b * s.h * s.q; ++row) {
    const int64_t q = row % s.q, bh = row / s.q, h = bh % s.h, b = bh / s.h;
    const float* query = c.query.data() + (b * s.h + h) * s.q * c.depth + q * c.depth;
    const float* key_t = c.key_t.data() + ((c.shared_keys ? 0 : b) * s.h + h) * c.depth * s.k;
    const float* bias = c.bias.data() + b * c.bias_strides[0] + h * c.bias_strides[1] + q * c.bias_strides[2];
    float* out = map.data() + row * s.k;
    float lane_max[32], lane_sum[32];
    for (int l = 0; l < 32; ++l) lane_max[l] = -INFINITY, lane_sum[l] = 0.0f;
    for (int64_t k = 0; k < s.k; ++k) {
      float acc = 0.0f;
      for (int64_t d = 0; d < c.depth; ++d) acc += query[d] * key_t[d * s.k + k];
      out[k] = acc * c.scale + bias[k * c.bias_strides[3]];
      lane_max[k % 32] = out[k] > lane_max[k % 32] ? out[k] : lane_max[k % 32];
    }
    for (int offset = 16; offset > 0; offset /= 2) {  // lane 0's view of the xor butterfly
      float next[32];
      for (int l = 0; l < 32; ++l) next[l] = lane_max[l ^ offset] > lane_max[l] ? lane_max[l ^ offset] : lane_max[l];
      std::copy(next, next + 32, lane_max);
    }
    const float most = lane_max[0];
    if (most == -INFINITY) {
      for (int64_t k = 0; k < s.k; ++k) out[k] = NAN;
      continue;
    }
    for (int64_t k = 0; k < s.k; ++k) {
      out[k] = std::exp(out[k] - most);
      lane_sum[k % 32] += out[k];
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      float next[32];
      for (int l = 0; l < 32; ++l) next[l] = lane_sum[l] + lane_sum[l ^ offset];
      std::copy(next, next + 32, lane_sum);
    }
    float first = 0.0f, second = 0.0f;
    for (int64_t k = 0; k < s.k; ++k) {
      out[k] /= lane_sum[0];
      if (out[k] > first) {
        second = first;
        first = out[k];
      } else if (out[k] > second) {
        second = out[k];
      }
    }
    if (s.k > 1 && first - second <= 1e-5f * first) return {};
  }
  return map;
}

std::vector<float> host_values(const FusedCase& c, const std::vector<float>& probs) {
  const Shape& s = c.s;
  std::vector<float> out(static_cast<size_t>(s.b * s.h * s.q * c.width));
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t e = static_cast<int64_t>(i) % c.width, row = static_cast<int64_t>(i) / c.width;
    const int64_t bh = row / s.q, h = bh % s.h, b = bh / s.h;
    const float* value = c.value.data() + (b * (c.shared_values ? 1 : s.h) + (c.shared_values ? 0 : h)) * s.k * c.width;
    float acc = 0.0f;
    for (int64_t k = 0; k < s.k; ++k) acc += probs[row * s.k + k] * value[k * c.width + e];
    out[i] = acc;
  }
  return out;
}

template <typename T>
T* to_device(const std::vector<T>& host, std::vector<void*>* owned) {
  void* p = nullptr;
  CUDA_OK(cudaMalloc(&p, std::max<size_t>(host.size(), 1) * sizeof(T)));
  if (!host.empty()) CUDA_OK(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  owned->push_back(p);
  return static_cast<T*>(p);
}

// Runs `cases` fused cases (all four bias kinds, both broadcasts, none/some/all flagged, some
// forced). Returns false on a mismatch.
bool fused_cases(Rng& rng, int cases, bool cpu_only, Coverage* coverage) {
  static const char* kHowFused[] = {"none", "some", "all", "one"};
  int failures = 0, run = 0;
  double max_diff = 0.0;
  bool seen_some = false, seen_all = false;  // a cut may find no gap and fall back to "none": go on until both ran
  for (int i = 0; (run < cases || (!(seen_some && seen_all) && run < 3 * cases)) && i < 60 * cases; ++i) {
    FusedCase c = random_fused_case(rng, run);
    const std::vector<float> map = host_map(c);
    if (map.empty()) continue;  // a near tie: redraw
    const Shape& s = c.s;
    Variant v;
    if (run % 3 == 2) {
      v.fb = s.b;
      v.fk = s.k;
      v.forced.resize(static_cast<size_t>(s.b * s.k));
      for (uint8_t& x : v.forced) x = uniform(rng, 0, 1) < 0.2 ? 1 : 0;
    }
    Detector d = random_detector(rng, s.h, false);
    std::string how = kHowFused[run % 4];
    if (place_cut(host_scores(map, s, d, false), how, rng, &d) < 0) {
      how = "none";
      place_cut(host_scores(map, s, d, false), how, rng, &d);
    }
    ++run;
    seen_some |= how == "some";
    seen_all |= how == "all";
    coverage->add("fused " + c.bias_kind + " bias");
    if (c.shared_keys || c.shared_values) coverage->add("fused broadcast");
    coverage->add("fused " + how + " flagged");
    std::vector<float> patched(map.size());
    std::vector<uint8_t> flags;
    std::vector<float> scores;
    std::vector<int64_t> per_item;
    cpu_atpatch(map.data(), patched.data(), s, d.view(), v, 1, nullptr, &per_item, &flags, &scores);
    const std::vector<float> expected = host_values(c, patched);
    if (cpu_only) continue;

    std::vector<void*> owned;
    atpatch::cuda::FusedProblem f;
    f.query = {to_device(c.query, &owned), s.h * s.q * c.depth, s.q * c.depth};
    f.key_t = {to_device(c.key_t, &owned), c.shared_keys ? 0 : s.h * c.depth * s.k, c.depth * s.k};
    const int64_t value_head = c.shared_values ? 0 : s.k * c.width;
    f.value = {to_device(c.value, &owned), (c.shared_values ? 1 : s.h) * s.k * c.width, value_head};
    f.bias = to_device(c.bias, &owned);
    std::copy(c.bias_strides, c.bias_strides + 4, f.bias_strides);
    f.batch = s.b, f.heads = s.h, f.q_len = s.q, f.k_len = s.k, f.depth = c.depth, f.width = c.width;
    f.scale = c.scale;
    std::vector<float> output(expected.size(), NAN);
    f.output = to_device(output, &owned);
    f.patch.w1 = to_device(d.w1, &owned);
    f.patch.b1 = to_device(d.b1, &owned);
    f.patch.w2 = to_device(d.w2, &owned);
    f.patch.b2 = to_device(std::vector<float>{d.b2}, &owned);
    f.patch.hidden = d.hidden;
    f.patch.forced = v.forced.empty() ? nullptr : to_device(v.forced, &owned);
    f.patch.forced_batch_stride = v.batch_stride();
    f.patch.forced_key_stride = v.key_stride();
    std::vector<uint8_t> gpu_flags(flags.size(), 0xee);
    std::vector<float> gpu_scores(scores.size(), NAN);
    f.patch.flags = to_device(gpu_flags, &owned);
    f.patch.scores = to_device(gpu_scores, &owned);
    const std::string error = atpatch::cuda::run_fused(f, nullptr);
    if (!error.empty()) {
      std::fprintf(stderr, "selftest: run_fused failed on %s: %s\n", s.str().c_str(), error.c_str());
      return false;
    }
    CUDA_OK(cudaStreamSynchronize(nullptr));
    CUDA_OK(cudaMemcpy(output.data(), f.output, output.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(gpu_flags.data(), f.patch.flags, gpu_flags.size(), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(gpu_scores.data(), f.patch.scores, gpu_scores.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (void* p : owned) cudaFree(p);
    std::string problem;
    if (gpu_flags != flags) problem = "the flags differ from the host's";
    for (size_t j = 0; problem.empty() && j < output.size(); ++j) {
      const double diff = std::fabs(static_cast<double>(output[j]) - expected[j]);
      max_diff = std::max(max_diff, diff);
      if (!(diff <= 1e-5) && !(std::isnan(output[j]) && std::isnan(expected[j]))) {
        problem = "output " + std::to_string(j) + ": gpu " + std::to_string(output[j]) + " vs host " +
                  std::to_string(expected[j]);
      }
    }
    for (size_t j = 0; problem.empty() && j < scores.size(); ++j) {
      const bool both_inf = std::isinf(scores[j]) && gpu_scores[j] == scores[j];
      const double diff = std::fabs(static_cast<double>(gpu_scores[j]) - scores[j]) / std::max(1.0, static_cast<double>(std::fabs(scores[j])));
      if (!both_inf && !(diff <= 1e-5)) {
        problem = "score " + std::to_string(j) + ": gpu " + std::to_string(gpu_scores[j]) + " vs host " +
                  std::to_string(scores[j]);
      }
    }
    if (!problem.empty()) {
      std::fprintf(stderr, "FAIL fused %s depth %lld width %lld bias %s flagged %s: %s\n", s.str().c_str(),
                   static_cast<long long>(c.depth), static_cast<long long>(c.width), c.bias_kind.c_str(), how.c_str(),
                   problem.c_str());
      ++failures;
    }
  }
  std::printf("fused (AtPatchAttention): %d cases%s, %d failed, max |gpu - host| output %.3g (tolerance 1e-5)\n", run,
              cpu_only ? " (host side only)" : "", failures, max_diff);
  return failures == 0 && run >= cases;
}

}  // namespace

// The host side of the CUDA self-test (cuda_selftest.cu): random cases, and the CPU kernel's
// arithmetic (core.cc) driven as custom_op.cc drives it, to compare the device code with.
// For cuda_selftest.cu only (one translation unit): hence the unnamed namespace.
#pragma once

#if defined(ATPATCH_CUDA_EMULATION)
#include "cuda_emulation.h"  // __half on the CPU emulation
#else
#include <cuda_fp16.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core.h"

namespace {

struct Shape {
  int64_t b, h, q, k;
  int64_t size() const { return b * h * q * k; }
  std::string str() const {
    return std::to_string(b) + "x" + std::to_string(h) + "x" + std::to_string(q) + "x" + std::to_string(k);
  }
};

// What a case runs besides the map: op v1 or v2, and v2's forced mask ([fb, fk], broadcast).
struct Variant {
  bool v1 = false;              // count every query row; no forced, no flags
  std::vector<uint8_t> forced;  // empty: nothing forced
  int64_t fb = 0, fk = 0;
  const uint8_t* forced_ptr() const { return forced.empty() ? nullptr : forced.data(); }
  int64_t batch_stride() const { return fb == 1 ? 0 : fk; }
  int64_t key_stride() const { return fk == 1 ? 0 : 1; }
};

struct Detector {
  std::vector<float> w1, b1, w2;  // w1: [features_per_head * heads, hidden]
  float b2 = 0.0f;
  int64_t hidden = 0;
  int features_per_head = atpatch::kFeaturesPerHead;  // kFeaturesPerHeadV1 for op v1
  atpatch::DetectorView view() const {
    return {w1.data(), b1.data(), w2.data(), b2, hidden, 0.0f, features_per_head};
  }
};

using Rng = std::mt19937_64;

double normal(Rng& rng) { return std::normal_distribution<double>(0.0, 1.0)(rng); }
double uniform(Rng& rng, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
int64_t integer(Rng& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi - 1)(rng); }

// tests/maps.py's random_map: a softmax of random scores, sometimes one column that soaks up
// attention, masked entries exactly 0. "padded" masks the last keys in every row, as BERT
// does: rows whose own key is padded are padding queries that still attend the real keys.
// "padded_rows" also zeroes the last query rows of each item, as exporters that mask padded
// queries do.
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

// A detector for maps of `heads` heads: op v2's features, or op v1's first three (`v1`).
Detector random_detector(Rng& rng, int64_t heads, bool v1) {
  Detector d;
  d.features_per_head = v1 ? atpatch::kFeaturesPerHeadV1 : atpatch::kFeaturesPerHead;
  d.hidden = integer(rng, 0, 4) == 0 ? 32 : integer(rng, 1, 9);
  d.w1.resize(static_cast<size_t>(d.features_per_head * heads * d.hidden));
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

// Workspace floats per (batch, head) block and key column, as custom_op.cc lays them out: the
// accumulators (4, plus 3 own-row features for op v2) and one row of float scratch.
int64_t block_floats(bool v1) { return v1 ? 5 : 8; }
atpatch::HeadColumns columns_at(float* base, int64_t k, bool v1) {
  if (v1) return {base, base + k, base + 2 * k, base + 3 * k, nullptr, nullptr, nullptr};
  return {base, base + k, base + 2 * k, base + 3 * k, base + 4 * k, base + 5 * k, base + 6 * k};
}

// Phase 1 for one block, as custom_op.cc's features_task: the counted rows (float16 converted
// to the float scratch `row`), their own-row features (op v2), then the finished features.
template <typename T>
void block_features(const T* block_in, const Shape& s, bool v1, float* row, const atpatch::HeadColumns& cols) {
  atpatch::clear_columns(cols, s.k);
  for (int64_t q = 0; q < s.q; ++q) {
    const T* src = block_in + q * s.k;
    if (!atpatch::counts_row(v1, q, s.q, s.k, [src](int64_t j) { return to_float(src[j]); })) continue;
    for (int64_t j = 0; j < s.k; ++j) row[j] = to_float(src[j]);
    const atpatch::RowStats stats = atpatch::row_stats(row, s.k);
    atpatch::accumulate_row(row, s.k, stats, cols);
    const int64_t own = atpatch::own_key(q, s.q, s.k);
    if (!v1 && own >= 0) atpatch::own_row(row, own, stats, cols);
  }
  atpatch::finish_columns(cols, s.k);
}

// The CPU kernel as custom_op.cc runs it: phase 1 per block, phase 2 per item, phase 3 per
// block (float16 rows converted to float scratch, converted back only when changed).
// `changed` (optional) gets one byte per row: 1 when the row was patched.
template <typename T>
void cpu_atpatch(const T* in, T* out, const Shape& s, const atpatch::DetectorView& d, const Variant& v, int threads,
                 std::vector<uint8_t>* changed, std::vector<int64_t>* patched_per_item, std::vector<uint8_t>* flags_out,
                 std::vector<float>* scores_out = nullptr) {
  const int64_t blocks = s.b * s.h, floats = block_floats(v.v1);
  std::vector<float> work(static_cast<size_t>(blocks * floats * s.k));
  std::vector<atpatch::HeadColumns> cols(static_cast<size_t>(blocks));
  for (int64_t i = 0; i < blocks; ++i) cols[i] = columns_at(work.data() + i * floats * s.k, s.k, v.v1);
  auto scratch = [&](int64_t block) { return work.data() + ((block + 1) * floats - 1) * s.k; };
  parallel_for(blocks, threads, [&](int64_t block) {
    block_features(in + block * s.q * s.k, s, v.v1, scratch(block), cols[block]);
  });
  std::vector<float> flags(static_cast<size_t>(s.b * s.k));  // P: flags OR forced
  std::vector<int64_t> flagged(static_cast<size_t>(s.b));
  if (flags_out) flags_out->assign(static_cast<size_t>(s.b * s.k), 0);
  if (scores_out) scores_out->assign(static_cast<size_t>(s.b * s.k), 0.0f);
  parallel_for(s.b, threads, [&](int64_t b) {
    const atpatch::ColumnMasks masks{v.forced_ptr() ? v.forced_ptr() + b * v.batch_stride() : nullptr, v.key_stride(),
                                     flags_out ? flags_out->data() + b * s.k : nullptr, flags.data() + b * s.k,
                                     scores_out ? scores_out->data() + b * s.k : nullptr};
    flagged[b] = atpatch::score_columns(cols.data() + b * s.h, s.h, s.k, d, masks);
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
  if (patched_per_item) *patched_per_item = flagged;
}

// The detector's scores per (item, column), computed from core.cc's features with the same MLP:
// only to place the threshold in a gap (tests/maps.py's with_flags). Columns no counted row
// attends cannot be flagged: they get NaN, which place_cut leaves out.
// `features` (optional) gets core.cc's features in the CUDA kernel's layout [b, f * heads + h, j]
// (d.features_per_head features per head: op v2's six, or op v1's three).
template <typename T>
std::vector<float> host_scores(const std::vector<T>& map, const Shape& s, const Detector& d, bool v1,
                               std::vector<float>* features = nullptr) {
  const int64_t blocks = s.b * s.h, floats = block_floats(v1);
  const int per_head = v1 ? atpatch::kFeaturesPerHeadV1 : atpatch::kFeaturesPerHead;
  std::vector<float> work(static_cast<size_t>(blocks * floats * s.k)), row(static_cast<size_t>(s.k));
  std::vector<atpatch::HeadColumns> cols(static_cast<size_t>(blocks));
  for (int64_t block = 0; block < blocks; ++block) {
    cols[block] = columns_at(work.data() + block * floats * s.k, s.k, v1);
    block_features(map.data() + block * s.q * s.k, s, v1, row.data(), cols[block]);
  }
  auto feature = [&](int64_t b, int f, int64_t h) {
    const auto& c = cols[b * s.h + h];
    const float* const all[] = {c.mass, c.peak, c.top, c.self, c.opeak, c.ofocus};
    return all[f];
  };
  if (features) {
    features->resize(static_cast<size_t>(s.b * per_head * s.h * s.k));
    for (int64_t b = 0; b < s.b; ++b) {
      for (int f = 0; f < per_head; ++f) {
        for (int64_t h = 0; h < s.h; ++h) {
          const float* src = feature(b, f, h);
          std::copy(src, src + s.k, features->data() + ((b * per_head + f) * s.h + h) * s.k);
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
        for (int f = 0; f < per_head; ++f) {
          for (int64_t h = 0; h < s.h; ++h) {
            dot += static_cast<double>(feature(b, f, h)[j]) * d.w1[(f * s.h + h) * d.hidden + i];
          }
        }
        const float z = static_cast<float>(dot) + d.b1[i];
        score += static_cast<double>(z > 0.0f ? z : 0.0f) * d.w2[i];
      }
      bool attended = false;
      for (int64_t h = 0; h < s.h; ++h) attended |= cols[b * s.h + h].peak[j] > 0.0f;
      scores[b * s.k + j] = attended ? static_cast<float>(score) + d.b2 : NAN;
    }
  }
  return scores;
}

// b2 shifted so that `how` (none/one/some/all) of the attended columns (scores not NaN) score
// above 0; returns how many columns that flags, or -1 when the scores leave no gap wider than
// 1e-3 for one/some (or there is no attended column).
int64_t place_cut(const std::vector<float>& raw_scores, const std::string& how, Rng& rng, Detector* d) {
  std::vector<float> scores;
  for (float x : raw_scores) {
    if (!std::isnan(x)) scores.push_back(x);
  }
  if (scores.empty()) return how == "none" || how == "all" ? 0 : -1;
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

}  // namespace

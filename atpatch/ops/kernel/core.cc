// Hot loops of the AtPatch kernel; written so the compiler vectorises them (branch-free
// selects, no aliasing between accumulators). See core.h for the phase structure.
#include "core.h"

#include <cmath>

// On x86-64 Linux, build an AVX2 clone of each hot loop next to the baseline one and let
// the loader pick (ifunc): the library stays portable and still uses wide vectors.
#if defined(ATPATCH_TARGET_CLONES) && defined(__x86_64__) && defined(__linux__) && \
    (defined(__GNUC__) || defined(__clang__))
#define ATPATCH_HOT __attribute__((target_clones("avx2", "default")))
#else
#define ATPATCH_HOT
#endif

namespace atpatch {

ATPATCH_HOT RowStats row_stats(const float* row, int64_t k_len) {
  float support = 0.0f;
  float max = 0.0f;
  for (int64_t j = 0; j < k_len; ++j) {
    const float v = row[j];
    support += v > 0.0f ? 1.0f : 0.0f;
    max = v > max ? v : max;
  }
  return {support, max};
}

void clear_columns(const HeadColumns& cols, int64_t k_len) {
  for (int64_t j = 0; j < k_len; ++j) {
    cols.mass[j] = 0.0f;
    cols.peak[j] = 0.0f;
    cols.top[j] = 0.0f;
    cols.rows[j] = 0.0f;
  }
}

ATPATCH_HOT void accumulate_row(const float* row, int64_t k_len, RowStats stats, const HeadColumns& cols) {
  float* __restrict mass = cols.mass;
  float* __restrict peak = cols.peak;
  float* __restrict top = cols.top;
  float* __restrict rows = cols.rows;
  const float n_q = stats.support;
  const float row_max = stats.max;
  for (int64_t j = 0; j < k_len; ++j) {
    const float v = row[j];
    const bool valid = v > 0.0f;
    // The reference sums attention * n_q over every row, masked ones included.
    mass[j] += v * n_q;
    peak[j] = v > peak[j] ? v : peak[j];
    top[j] += (valid && v >= row_max) ? 1.0f : 0.0f;
    rows[j] += valid ? 1.0f : 0.0f;
  }
}

void finish_columns(const HeadColumns& cols, int64_t k_len) {
  for (int64_t j = 0; j < k_len; ++j) {
    const float rows = cols.rows[j] > 1.0f ? cols.rows[j] : 1.0f;
    cols.mass[j] /= rows;
    cols.top[j] /= rows;
  }
}

int64_t score_columns(const HeadColumns* heads, int64_t num_heads, int64_t k_len,
                      const DetectorView& d, uint8_t* flags) {
  const float heads_count = static_cast<float>(num_heads);
  int64_t flagged = 0;
  for (int64_t j = 0; j < k_len; ++j) {
    // Same order as the reference: sums over heads in head order, then one division.
    float mass_sum = 0.0f, mass_max = 0.0f, peak_sum = 0.0f, top_sum = 0.0f;
    for (int64_t h = 0; h < num_heads; ++h) {
      const float m = heads[h].mass[j];
      mass_sum += m;
      mass_max = m > mass_max ? m : mass_max;
      peak_sum += heads[h].peak[j];
      top_sum += heads[h].top[j];
    }
    const float features[kNumFeatures] = {mass_sum / heads_count, mass_max, peak_sum / heads_count,
                                          top_sum / heads_count};
    // score = w2 . relu(features @ w1 + b1) + b2; the dot in double keeps it close to
    // numpy's BLAS result whatever order that used.
    double score = 0.0;
    for (int64_t i = 0; i < d.hidden; ++i) {
      float z = 0.0f;
      for (int f = 0; f < kNumFeatures; ++f) z += features[f] * d.w1[f * d.hidden + i];
      z += d.b1[i];
      const float hidden = z > 0.0f ? z : 0.0f;
      score += static_cast<double>(hidden) * static_cast<double>(d.w2[i]);
    }
    const float s = static_cast<float>(score) + d.b2;
    flags[j] = s > d.threshold ? 1 : 0;
    flagged += flags[j];
  }
  return flagged;
}

ATPATCH_HOT bool patch_row(const float* row, int64_t k_len, const uint8_t* flags, float* out) {
  float n = 0.0f, n_kept = 0.0f, hits = 0.0f;
  double kept_sum = 0.0;  // numpy sums the row pairwise; double lands on the same float
  for (int64_t j = 0; j < k_len; ++j) {
    const float v = row[j];
    const bool valid = v > 0.0f;
    const bool hit = valid && flags[j];
    const bool kept = valid && !flags[j];
    n += valid ? 1.0f : 0.0f;
    hits += hit ? 1.0f : 0.0f;
    n_kept += kept ? 1.0f : 0.0f;
    kept_sum += kept ? static_cast<double>(v) : 0.0;
  }
  if (hits == 0.0f || n_kept == 0.0f) return false;
  const float flagged_value = 1.0f / n;
  const float scale = n_kept / (n * static_cast<float>(kept_sum));
  for (int64_t j = 0; j < k_len; ++j) {
    const float v = row[j];
    const bool valid = v > 0.0f;
    out[j] = valid ? (flags[j] ? flagged_value : v * scale) : 0.0f;
  }
  return true;
}

}  // namespace atpatch

// Hot loops of the AtPatch kernel; written so the compiler vectorises them (branch-free
// selects, no aliasing between accumulators). See core.h for the phase structure.
#include "core.h"

#include <cmath>
#include <limits>

// On x86-64 Linux, build an AVX2 clone of each hot loop next to the baseline one and let
// the loader pick (ifunc): the library stays portable and still uses wide vectors.
#if defined(ATPATCH_TARGET_CLONES) && defined(__x86_64__) && defined(__linux__) && \
    (defined(__GNUC__) || defined(__clang__))
#define ATPATCH_HOT __attribute__((target_clones("avx2", "default")))
#else
#define ATPATCH_HOT
#endif

namespace atpatch {

// Reductions run in kLanes independent lanes: a single float accumulator is a chain the
// compiler may not reorder (no -ffast-math), lanes let it use full vectors. Counts are
// floats holding small integers (exact below 2^24, which Compute enforces); max is
// order-independent. Conditions are float selects, never && or ||: those are branches
// to the vectoriser.
constexpr int64_t kLanes = 16;

ATPATCH_HOT RowStats row_stats(const float* row, int64_t k_len) {
  // One pass: n_q, the row maximum and the sum of squares (own-row features, op v2) together.
  float support[kLanes] = {};
  float max[kLanes] = {};
  float squares[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= k_len; j += kLanes) {
    // Kept a loop: fully unrolled, its 48 accumulators become scalars that GCC (12) does not
    // vectorise; as a loop over the lane arrays it does (8 lanes at a time with AVX2).
#pragma GCC unroll 1
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = row[j + l];
      support[l] += v > 0.0f ? 1.0f : 0.0f;
      max[l] = v > max[l] ? v : max[l];
      squares[l] += v * v;
    }
  }
  for (; j < k_len; ++j) {
    const float v = row[j];
    support[0] += v > 0.0f ? 1.0f : 0.0f;
    max[0] = v > max[0] ? v : max[0];
    squares[0] += v * v;
  }
  float total = 0.0f, m = 0.0f;
  double sum = 0.0;  // lanes combined in double, in lane order: close to numpy's pairwise sum
  for (int64_t l = 0; l < kLanes; ++l) {
    total += support[l];
    m = max[l] > m ? max[l] : m;
    sum += squares[l];
  }
  return {total, m, static_cast<float>(sum)};
}

void clear_columns(const HeadColumns& cols, int64_t k_len) {
  float* const all[] = {cols.mass, cols.peak, cols.top, cols.rows, cols.self, cols.opeak, cols.ofocus};
  for (float* c : all) {
    if (c == nullptr) continue;  // op v1: no own-row features
    for (int64_t j = 0; j < k_len; ++j) c[j] = 0.0f;
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
    const float valid = v > 0.0f ? 1.0f : 0.0f;
    // The reference sums attention * n_q over every counted row, masked entries included (they add 0).
    mass[j] += v * n_q;
    peak[j] = v > peak[j] ? v : peak[j];
    top[j] += v >= row_max ? valid : 0.0f;
    rows[j] += valid;
  }
}

void finish_columns(const HeadColumns& cols, int64_t k_len) {
  for (int64_t j = 0; j < k_len; ++j) {
    const float rows = cols.rows[j] > 1.0f ? cols.rows[j] : 1.0f;
    cols.mass[j] /= rows;
    cols.top[j] /= rows;
  }
}

namespace {
// Feature f (spec.FEATURE_NAMES order: mass, peak, top, self, opeak, ofocus) of one finished block.
const float* feature_of(const HeadColumns& c, int f) {
  const float* const all[] = {c.mass, c.peak, c.top, c.self, c.opeak, c.ofocus};
  return all[f];
}
// Hidden units scored together (a stack buffer of doubles).
constexpr int64_t kScoreChunk = 64;
}  // namespace

int64_t score_columns(const HeadColumns* heads, int64_t num_heads, int64_t k_len,
                      const DetectorView& d, const ColumnMasks& out) {
  int64_t patched = 0;
  for (int64_t j = 0; j < k_len; ++j) {
    bool attended = false;
    for (int64_t h = 0; h < num_heads; ++h) attended |= heads[h].peak[j] > 0.0f;
    bool flag = false;
    if (attended) {  // an unattended column cannot be flagged: its score is not needed
      // features[j] = (mass[0..H-1], peak[..], top[..], self[..], opeak[..], ofocus[..]): feature
      // f of head h is w1's row r = f * H + h (op v1: the first three only). score = w2 .
      // relu(features @ w1 + b1) + b2; both dots in double keep it close to numpy's BLAS result
      // whatever order that used. Each hidden unit's dot sums over r in order (as the CUDA kernel
      // does), the units kScoreChunk at a time so that the loop reads w1's rows contiguously and
      // vectorises over the units, with no allocation.
      double score = 0.0;
      for (int64_t i0 = 0; i0 < d.hidden; i0 += kScoreChunk) {
        const int64_t n = d.hidden - i0 < kScoreChunk ? d.hidden - i0 : kScoreChunk;
        double dot[kScoreChunk];
        for (int64_t i = 0; i < n; ++i) dot[i] = 0.0;
        for (int f = 0; f < d.features_per_head; ++f) {
          for (int64_t h = 0; h < num_heads; ++h) {
            const double x = feature_of(heads[h], f)[j];
            const float* w = d.w1 + (f * num_heads + h) * d.hidden + i0;
            for (int64_t i = 0; i < n; ++i) dot[i] += x * static_cast<double>(w[i]);
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const float z = static_cast<float>(dot[i]) + d.b1[i0 + i];
          const float hidden = z > 0.0f ? z : 0.0f;
          score += static_cast<double>(hidden) * static_cast<double>(d.w2[i0 + i]);
        }
      }
      const float s = static_cast<float>(score) + d.b2;
      flag = s > d.threshold;
    }
    const bool patch = flag || (out.forced != nullptr && out.forced[j * out.forced_stride] != 0);
    if (out.flags != nullptr) out.flags[j] = flag ? 1 : 0;
    out.patch[j] = patch ? 1.0f : 0.0f;
    patched += patch ? 1 : 0;
  }
  return patched;
}

ATPATCH_HOT bool patch_row(const float* row, int64_t k_len, const float* patch, float* out) {
  float hits[kLanes] = {}, kept[kLanes] = {}, kept_sum[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= k_len; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = row[j + l];
      const float valid = v > 0.0f ? 1.0f : 0.0f;
      const float hit = valid * patch[j + l];
      const float keep = valid - hit;
      hits[l] += hit;
      kept[l] += keep;
      kept_sum[l] += keep > 0.0f ? v : 0.0f;
    }
  }
  for (; j < k_len; ++j) {
    const float v = row[j];
    const float valid = v > 0.0f ? 1.0f : 0.0f;
    const float hit = valid * patch[j];
    const float keep = valid - hit;
    hits[0] += hit;
    kept[0] += keep;
    kept_sum[0] += keep > 0.0f ? v : 0.0f;
  }
  float n_hits = 0.0f, n_kept = 0.0f;
  double sum = 0.0;  // lanes combined in double: close to numpy's pairwise sum
  for (int64_t l = 0; l < kLanes; ++l) {
    n_hits += hits[l];
    n_kept += kept[l];
    sum += kept_sum[l];
  }
  if (n_hits == 0.0f || n_kept == 0.0f) return false;

  // The benign value m: the smallest unmasked entry outside P. A pass of its own: folded
  // into the loop above, GCC threads the selects into branches and vectorises neither.
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float low[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) low[l] = kInf;
  for (j = 0; j + kLanes <= k_len; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = row[j + l];
      const float unmasked = v > 0.0f ? v : kInf;
      const float candidate = patch[j + l] != 0.0f ? kInf : unmasked;
      low[l] = candidate < low[l] ? candidate : low[l];
    }
  }
  for (; j < k_len; ++j) {
    const float v = row[j];
    const float unmasked = v > 0.0f ? v : kInf;
    const float candidate = patch[j] != 0.0f ? kInf : unmasked;
    low[0] = candidate < low[0] ? candidate : low[0];
  }
  float benign = kInf;
  for (int64_t l = 0; l < kLanes; ++l) benign = low[l] < benign ? low[l] : benign;

  // Same float32 expressions as the reference: total = S + k * m, then m / total, a / total.
  const float total = static_cast<float>(sum) + n_hits * benign;
  for (j = 0; j < k_len; ++j) {
    // Select the numerator, then divide every entry: a division used on one path only is
    // sunk into a branch (it may trap), which stops vectorisation. Masked entries give
    // 0 / total = 0, as total > 0.
    const float v = row[j];
    const float numerator = patch[j] != 0.0f ? benign : v;
    out[j] = (v > 0.0f ? numerator : 0.0f) / total;
  }
  return true;
}

}  // namespace atpatch

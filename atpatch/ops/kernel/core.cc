// Hot loops of the AtPatch kernel; written so the compiler vectorises them (branch-free
// selects, no aliasing between accumulators). See core.h for the phase structure.
#include "core.h"

#include <cmath>
#include <limits>
#include <vector>

namespace atpatch {

// Reductions run in kLanes independent lanes: a single float accumulator is a chain the
// compiler may not reorder (no -ffast-math), lanes let it use full vectors. Counts are
// floats holding small integers (exact below 2^24, which Compute enforces); max is
// order-independent. Conditions are float selects, never && or ||: those are branches
// to the vectoriser.
constexpr int64_t kLanes = 16;

namespace {
struct Lanes {
  float support[kLanes];
  float max[kLanes];
  float squares[kLanes];
};

// row_stats' pass over the row, into per-lane sums; inlined into each clone of its callers.
__attribute__((always_inline)) inline void fill_lanes(const float* row, int64_t k_len, Lanes& s) {
  for (int64_t l = 0; l < kLanes; ++l) s.support[l] = s.max[l] = s.squares[l] = 0.0f;
  int64_t j = 0;
  for (; j + kLanes <= k_len; j += kLanes) {
    // Kept a loop: fully unrolled, its 48 accumulators become scalars that GCC (12) does not
    // vectorise; as a loop over the lane arrays it does (8 lanes at a time with AVX2).
#pragma GCC unroll 1
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = row[j + l];
      s.support[l] += v > 0.0f ? 1.0f : 0.0f;
      s.max[l] = v > s.max[l] ? v : s.max[l];
      s.squares[l] += v * v;
    }
  }
  for (; j < k_len; ++j) {
    const float v = row[j];
    s.support[0] += v > 0.0f ? 1.0f : 0.0f;
    s.max[0] = v > s.max[0] ? v : s.max[0];
    s.squares[0] += v * v;
  }
}
}  // namespace

ATPATCH_HOT RowStats row_stats(const float* row, int64_t k_len) {
  // One pass: n_q, the row maximum and the sum of squares (own-row features, op v2) together.
  Lanes s;
  fill_lanes(row, k_len, s);
  float total = 0.0f, m = 0.0f;
  double sum = 0.0;  // lanes combined in double, in lane order: close to numpy's pairwise sum
  for (int64_t l = 0; l < kLanes; ++l) {
    total += s.support[l];
    m = s.max[l] > m ? s.max[l] : m;
    sum += s.squares[l];
  }
  return {total, m, static_cast<float>(sum)};
}

ATPATCH_HOT void row_stats_group(const float* const* rows, int64_t k_len, RowStats* out) {
  // row_stats of kRowGroup rows, their lane combines interleaved: each is a chain of 16 dependent
  // double additions (it must keep the lane order), which one row at a time left the core waiting
  // on (a third of phase 1 on 50-key maps); four independent chains overlap.
  Lanes s[kRowGroup];
  for (int r = 0; r < kRowGroup; ++r) fill_lanes(rows[r], k_len, s[r]);
  float total[kRowGroup] = {}, m[kRowGroup] = {};
  double sum[kRowGroup] = {};
  for (int64_t l = 0; l < kLanes; ++l) {
#pragma GCC unroll 4
    for (int r = 0; r < kRowGroup; ++r) {
      total[r] += s[r].support[l];
      m[r] = s[r].max[l] > m[r] ? s[r].max[l] : m[r];
      sum[r] += s[r].squares[l];
    }
  }
  for (int r = 0; r < kRowGroup; ++r) out[r] = {total[r], m[r], static_cast<float>(sum[r])};
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

namespace {
// accumulate_rows' loop; its rows as separate restrict parameters (restrict locals loaded from
// an array left GCC 12 unable to vectorise it). Inlined into each clone of accumulate_rows.
__attribute__((always_inline)) inline void accumulate4(const float* __restrict r0, const float* __restrict r1,
                                                       const float* __restrict r2, const float* __restrict r3,
                                                       const RowStats* stats, const HeadColumns& cols,
                                                       int64_t k_len) {
  // accumulate_row for kRowGroup rows, unrolled: each column's sums still add the rows in order
  // (the same float32 results), but its four accumulators are loaded and stored once per group
  // instead of once per row, which was most of phase 1's time (0.47 ns per entry at 512 keys).
  float* __restrict mass = cols.mass;
  float* __restrict peak = cols.peak;
  float* __restrict top = cols.top;
  float* __restrict rows = cols.rows;
  // Scalars, not stats[i] in the loop: a store to an accumulator might alias those for all GCC
  // knows, and that alone kept it from vectorising.
  const float n0 = stats[0].support, n1 = stats[1].support, n2 = stats[2].support, n3 = stats[3].support;
  const float x0 = stats[0].max, x1 = stats[1].max, x2 = stats[2].max, x3 = stats[3].max;
  static_assert(kRowGroup == 4, "unrolled for four rows");
  for (int64_t j = 0; j < k_len; ++j) {
    const float v0 = r0[j], v1 = r1[j], v2 = r2[j], v3 = r3[j];
    const float c0 = v0 > 0.0f ? 1.0f : 0.0f, c1 = v1 > 0.0f ? 1.0f : 0.0f;
    const float c2 = v2 > 0.0f ? 1.0f : 0.0f, c3 = v3 > 0.0f ? 1.0f : 0.0f;
    float m = mass[j];
    m += v0 * n0;
    m += v1 * n1;
    m += v2 * n2;
    m += v3 * n3;
    mass[j] = m;
    float p = peak[j];
    p = v0 > p ? v0 : p;
    p = v1 > p ? v1 : p;
    p = v2 > p ? v2 : p;
    p = v3 > p ? v3 : p;
    peak[j] = p;
    float t = top[j];
    t += v0 >= x0 ? c0 : 0.0f;
    t += v1 >= x1 ? c1 : 0.0f;
    t += v2 >= x2 ? c2 : 0.0f;
    t += v3 >= x3 ? c3 : 0.0f;
    top[j] = t;
    float n = rows[j];
    n += c0;
    n += c1;
    n += c2;
    n += c3;
    rows[j] = n;
  }
}

}  // namespace

ATPATCH_HOT void accumulate_rows(const float* const* row, const RowStats* stats, const HeadColumns& cols,
                                 int64_t k_len) {
  accumulate4(row[0], row[1], row[2], row[3], stats, cols, k_len);
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
// Columns scored together: stack buffers of doubles, and the units' dots on the heap.
constexpr int64_t kScoreChunk = 64;
}  // namespace

ATPATCH_HOT int64_t score_columns(const HeadColumns* heads, int64_t num_heads, int64_t k_len,
                                  const DetectorView& d, const ColumnMasks& out) {
  // features[j] = (mass[0..H-1], peak[..], top[..], self[..], opeak[..], ofocus[..]): feature f of
  // head h is w1's row r = f * H + h (op v1: the first three only). score = w2 . relu(features @ w1
  // + b1) + b2; both dots in double keep it close to numpy's BLAS result whatever order that used.
  // Each hidden unit's dot sums over r in order and the score over the units in order (as the CUDA
  // kernel does). The loops run over kScoreChunk columns at a time, innermost, because each feature
  // is contiguous over the columns: they vectorise there, where the hidden units (8 by default) and
  // a per-column loop did not (a 50-column ViT map scored 5x slower). Unattended columns are scored
  // too (their features are finite) and never flagged.
  int64_t patched = 0;
  const int64_t rows = static_cast<int64_t>(d.features_per_head) * num_heads;
  const int64_t hidden = d.hidden;
  // The units' dots for one chunk, unit-major, accumulated row by row of w1 (each unit's dot still
  // sums over r in order): per (unit, row) the former loop looked the feature up with an integer
  // division and ran a short loop GCC left scalar, most of phase 2 on short maps.
  std::vector<double> dots(static_cast<size_t>(hidden * kScoreChunk));
  for (int64_t j0 = 0; j0 < k_len; j0 += kScoreChunk) {
    const int64_t n = k_len - j0 < kScoreChunk ? k_len - j0 : kScoreChunk;
    double score[kScoreChunk];
    double x[kScoreChunk];
    for (int64_t c = 0; c < n; ++c) score[c] = 0.0;
    for (int64_t k = 0; k < hidden * n; ++k) dots[k] = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* feature = feature_of(heads[r % num_heads], static_cast<int>(r / num_heads)) + j0;
      for (int64_t c = 0; c < n; ++c) x[c] = static_cast<double>(feature[c]);
      const float* w1 = d.w1 + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        const double w = static_cast<double>(w1[i]);
        double* __restrict dot = dots.data() + i * n;
        for (int64_t c = 0; c < n; ++c) dot[c] += x[c] * w;
      }
    }
    for (int64_t i = 0; i < hidden; ++i) {
      const double* dot = dots.data() + i * n;
      const float b1 = d.b1[i];
      const double w2 = static_cast<double>(d.w2[i]);
      for (int64_t c = 0; c < n; ++c) {
        const float z = static_cast<float>(dot[c]) + b1;
        const float unit = z > 0.0f ? z : 0.0f;
        score[c] += static_cast<double>(unit) * w2;
      }
    }
    for (int64_t c = 0; c < n; ++c) {
      const int64_t j = j0 + c;
      bool attended = false;
      for (int64_t h = 0; h < num_heads; ++h) attended |= heads[h].peak[j] > 0.0f;
      const float value = static_cast<float>(score[c]) + d.b2;
      const bool flag = attended && value > d.threshold;
      if (out.scores != nullptr) out.scores[j] = attended ? value : -std::numeric_limits<float>::infinity();
      const bool patch = flag || (out.forced != nullptr && out.forced[j * out.forced_stride] != 0);
      if (out.flags != nullptr) out.flags[j] = flag ? 1 : 0;
      out.patch[j] = patch ? 1.0f : 0.0f;
      patched += patch ? 1 : 0;
    }
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

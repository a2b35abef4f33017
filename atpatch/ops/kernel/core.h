// The AtPatch arithmetic, free of any onnxruntime type: see atpatch/ops/spec.py.
//
// The kernel glue (custom_op.cc) splits the work into three parallel phases:
//   1. per (batch, head) block: per-head column features     -> accumulate_row()
//      over the counted query rows (counts_row())
//   2. per batch item: gather per-head features, score, flag  -> score_columns()
//   3. per (batch, head) block: patch each row                -> patch_row()
// Arithmetic follows atpatch/ops/reference.py in float32 (same reduction order where
// numpy's is sequential), so results agree with the oracle to rounding.
//
// Op v1 (models patched before v2) differs only in which rows phase 1 counts: every row
// (count_every_row) instead of the real ones. It has no `forced` and no `flags` output; the
// phases, and so the arithmetic, are the same.
#pragma once

#include <cstddef>
#include <cstdint>

namespace atpatch {

// spec.FEATURES_PER_HEAD: mass, peak, top, each per head. A column's feature vector has
// kFeaturesPerHead * heads entries, feature f of head h at index f * heads + h.
constexpr int kFeaturesPerHead = 3;
constexpr int kFeatureVersion = 3;          // spec.FEATURE_VERSION: real query rows only (op v2)
constexpr int kFeatureVersionEveryRow = 2;  // op v1: every query row counted

// Per-(batch, head) column accumulators, each k_len floats, laid out contiguously.
struct HeadColumns {
  float* mass;  // sum_q attention * n_q over counted rows, then divided by `rows`
  float* peak;  // max_q attention over counted rows (initial 0)
  float* top;   // rows whose maximum is at this column, then divided likewise
  float* rows;  // unmasked counted rows of this column
};

// Whether phase 1 counts query row q of a block (spec.py, "Real queries"). The row sits at key
// position c = k_len - q_len + q (the last q_len keys belong to the queries, whatever KV cache
// comes before them); it is a padding query when its own entry is masked (not > 0, so NaN too,
// as in the reference); rows with c < 0 (more queries than keys) are real. `entry(c)` reads the
// row's entry c as float: one read per row decides, so padding rows cost nothing more.
template <typename Entry>
inline bool counts_row(bool count_every_row, int64_t q, int64_t q_len, int64_t k_len, Entry entry) {
  if (count_every_row) return true;  // op v1
  const int64_t own = k_len - q_len + q;
  return own < 0 || entry(own) > 0.0f;
}

// Row statistics of a counted row, for its features.
struct RowStats {
  float support;  // n_q: unmasked (> 0) entries
  float max;      // max entry, initial 0
};

RowStats row_stats(const float* row, int64_t k_len);

// Zero the accumulators of one block.
void clear_columns(const HeadColumns& cols, int64_t k_len);

// Add one counted row to the block's accumulators.
void accumulate_row(const float* row, int64_t k_len, RowStats stats, const HeadColumns& cols);

// Turn the sums of a block into the per-head mass and top features (in place).
void finish_columns(const HeadColumns& cols, int64_t k_len);

struct DetectorView {
  const float* w1;  // [kFeaturesPerHead * heads, hidden]
  const float* b1;  // [hidden]
  const float* w2;  // [hidden]
  float b2;
  int64_t hidden;
  float threshold;
};

// Phase 2's outputs for one batch item.
struct ColumnMasks {
  const uint8_t* forced;  // the item's forced row (bool bytes), nullptr for none (op v1)
  int64_t forced_stride;  // 0 when forced broadcasts over the keys ([.., 1])
  uint8_t* flags;         // [k_len] the op's `flags` output (0/1), or nullptr when not wanted
  float* patch;           // [k_len] P = flags OR forced: 1.0 patched, 0.0 not (the row loops read it as is)
};

// Phase 2 for one batch item: heads[h] are that item's finished blocks (num_heads of them,
// matching w1's kFeaturesPerHead * num_heads rows). A column is flagged when its score is above
// the threshold and some counted row of some head has it unmasked (some head's peak > 0: the
// peak starts at 0 and only an entry > 0 raises it). Op v1 had no such condition; it changes no
// v1 output, as no row has an unmasked entry in such a column to patch. Returns |P|.
int64_t score_columns(const HeadColumns* heads, int64_t num_heads, int64_t k_len,
                      const DetectorView& detector, const ColumnMasks& out);

// Phase 3 for one row, every row (padding rows too): unmasked entries in P (`patch`) get the
// row's smallest unmasked entry outside P, m, and the row is renormalised (in P -> m / (S + k m),
// others -> a / (S + k m)). Writes the patched row to `out` and returns true, or returns false
// (row unchanged, nothing written) when no unmasked entry is in P or all are.
// `out` may alias `row` (in-place).
bool patch_row(const float* row, int64_t k_len, const float* patch, float* out);

}  // namespace atpatch

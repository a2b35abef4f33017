// The AtPatch arithmetic, free of any onnxruntime type: see atpatch/ops/spec.py.
//
// The kernel glue (custom_op.cc) splits the work into three parallel phases:
//   1. per (batch, head) block: per-head column features     -> accumulate_row()
//   2. per batch item: gather per-head features, score, flag  -> score_columns()
//   3. per (batch, head) block: patch each row                -> patch_row()
// Arithmetic follows atpatch/ops/reference.py in float32 (same reduction order where
// numpy's is sequential), so results agree with the oracle to rounding.
#pragma once

#include <cstddef>
#include <cstdint>

namespace atpatch {

// spec.FEATURES_PER_HEAD: mass, peak, top, each per head. A column's feature vector has
// kFeaturesPerHead * heads entries, feature f of head h at index f * heads + h.
constexpr int kFeaturesPerHead = 3;
constexpr int kFeatureVersion = 2;  // spec.FEATURE_VERSION

// Per-(batch, head) column accumulators, each k_len floats, laid out contiguously.
struct HeadColumns {
  float* mass;  // sum_q attention * n_q, then divided by the column's unmasked rows
  float* peak;  // max_q attention (initial 0)
  float* top;   // rows whose maximum is at this column, then divided likewise
  float* rows;  // unmasked rows of this column (count)
};

// Row statistics used by both the features and the patch.
struct RowStats {
  float support;  // n_q: unmasked (> 0) entries
  float max;      // max entry, initial 0
};

RowStats row_stats(const float* row, int64_t k_len);

// Zero the accumulators of one block.
void clear_columns(const HeadColumns& cols, int64_t k_len);

// Add one row to the block's accumulators.
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

// Phase 2 for one batch item: heads[h] are that item's finished blocks (num_heads of them,
// matching w1's kFeaturesPerHead * num_heads rows); writes flags[k]
// (1.0 flagged, 0.0 not: a float mask the row loops use as is) and returns the number of flagged columns.
int64_t score_columns(const HeadColumns* heads, int64_t num_heads, int64_t k_len,
                      const DetectorView& detector, float* flags);

// Phase 3 for one row: flagged unmasked entries get the row's smallest unflagged unmasked
// entry m, and the row is renormalised (flagged -> m / (S + k m), unflagged -> a / (S + k m)).
// Writes the patched row to `out` and returns true, or returns false (row unchanged,
// nothing written) when no unmasked entry is flagged or all are.
// `out` may alias `row` (in-place).
bool patch_row(const float* row, int64_t k_len, const float* flags, float* out);

}  // namespace atpatch

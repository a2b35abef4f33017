// The AtPatch arithmetic, free of any onnxruntime type: see atpatch/ops/spec.py.
//
// The kernel glue (custom_op.cc) splits the work into three parallel phases:
//   1. per (batch, head) block: per-head column features     -> row_stats(), accumulate_row(),
//      over the counted query rows (counts_row()), and the       own_row() (float32: four rows at
//      own-row features each counted row gives its own column    a time, row_stats_group(),
//                                                                accumulate_rows())
//   2. per batch item: gather per-head features, score, flag  -> score_columns()
//   3. per (batch, head) block: patch each row                -> patch_row()
// Arithmetic follows atpatch/ops/reference.py in float32 (same reduction order where
// numpy's is sequential), so results agree with the oracle to rounding.
//
// Op v1 (models patched before v2) differs in which rows phase 1 counts: every row
// (count_every_row) instead of the real ones, and in its features: the first three only
// (kFeaturesPerHeadV1, no own-row features). It has no `forced` and no `flags` output; the
// phases, and so the arithmetic of those three, are the same.
#pragma once

#include <cstddef>
#include <cstdint>

// On x86-64 Linux, build an AVX2 clone of each hot loop next to the baseline one and let
// the loader pick (ifunc): the library stays portable and still uses wide vectors.
#if defined(ATPATCH_TARGET_CLONES) && defined(__x86_64__) && defined(__linux__) && \
    (defined(__GNUC__) || defined(__clang__))
#define ATPATCH_HOT __attribute__((target_clones("avx2", "default")))
#else
#define ATPATCH_HOT
#endif

namespace atpatch {

// spec.FEATURES_PER_HEAD: mass, peak, top (what the column receives), self, opeak, ofocus (how
// the column's own query row attends), each per head. A column's feature vector has
// kFeaturesPerHead * heads entries, feature f of head h at index f * heads + h.
constexpr int kFeaturesPerHead = 6;
constexpr int kFeaturesPerHeadV1 = 3;       // op v1: mass, peak, top
constexpr int kFeatureVersion = 4;          // spec.FEATURE_VERSION: real query rows, own-row features (op v2)
constexpr int kFeatureVersionEveryRow = 2;  // op v1: every query row counted, the first three features

// Per-(batch, head) column accumulators, each k_len floats, laid out contiguously.
struct HeadColumns {
  float* mass;  // sum_q attention * n_q over counted rows, then divided by `rows`
  float* peak;  // max_q attention over counted rows (initial 0)
  float* top;   // rows whose maximum is at this column, then divided likewise
  float* rows;  // unmasked counted rows of this column
  // The column's own query row o (key position k_len - q_len + o == j), when it is counted;
  // else 0. nullptr for op v1, which has no such features.
  float* self;    // attention[o, j] * n_o
  float* opeak;   // max_k attention[o, k] * n_o
  float* ofocus;  // sum_k attention[o, k]^2 * n_o
};

// The key position of query row q: k_len - q_len + q; negative when the row has no key of its
// own (more queries than keys). Always below k_len.
inline int64_t own_key(int64_t q, int64_t q_len, int64_t k_len) { return k_len - q_len + q; }

// Whether phase 1 counts query row q of a block (spec.py, "Real queries"). The row sits at key
// position c = k_len - q_len + q (the last q_len keys belong to the queries, whatever KV cache
// comes before them); it is a padding query when its own entry is masked (not > 0, so NaN too,
// as in the reference); rows with c < 0 (more queries than keys) are real. `entry(c)` reads the
// row's entry c as float: one read per row decides, so padding rows cost nothing more.
template <typename Entry>
inline bool counts_row(bool count_every_row, int64_t q, int64_t q_len, int64_t k_len, Entry entry) {
  if (count_every_row) return true;  // op v1
  const int64_t own = own_key(q, q_len, k_len);
  return own < 0 || entry(own) > 0.0f;
}

// Row statistics of a counted row, for its features: one pass over the row.
struct RowStats {
  float support;  // n_q: unmasked (> 0) entries
  float max;      // max entry, initial 0
  float squares;  // sum of the squared entries (masked ones add 0): lanes in float32, combined in double
};

RowStats row_stats(const float* row, int64_t k_len);

// Zero the accumulators of one block (the own-row ones too, when there are).
void clear_columns(const HeadColumns& cols, int64_t k_len);

// Add one counted row to the block's accumulators.
void accumulate_row(const float* row, int64_t k_len, RowStats stats, const HeadColumns& cols);

// Phase 1's float32 path takes counted rows kRowGroup at a time; these two give the same results,
// bit for bit, as row_stats and accumulate_row called on the rows one by one, in order.
constexpr int kRowGroup = 4;
void row_stats_group(const float* const* rows, int64_t k_len, RowStats* out);
void accumulate_rows(const float* const* rows, const RowStats* stats, const HeadColumns& cols, int64_t k_len);

// Op v2: the own-row features of column `own` (own_key() of a counted row, 0 <= own < k_len),
// from that row and its statistics. Columns whose own row is not counted keep their 0.
inline void own_row(const float* row, int64_t own, RowStats stats, const HeadColumns& cols) {
  cols.self[own] = row[own] * stats.support;
  cols.opeak[own] = stats.max * stats.support;
  cols.ofocus[own] = stats.squares * stats.support;
}

// Turn the sums of a block into the per-head mass and top features (in place).
void finish_columns(const HeadColumns& cols, int64_t k_len);

struct DetectorView {
  const float* w1;  // [features_per_head * heads, hidden]
  const float* b1;  // [hidden]
  const float* w2;  // [hidden]
  float b2;
  int64_t hidden;
  float threshold;
  int features_per_head;  // kFeaturesPerHead (op v2) or kFeaturesPerHeadV1: the first ones of HeadColumns
};

// Phase 2's outputs for one batch item.
struct ColumnMasks {
  const uint8_t* forced;  // the item's forced row (bool bytes), nullptr for none (op v1)
  int64_t forced_stride;  // 0 when forced broadcasts over the keys ([.., 1])
  uint8_t* flags;         // [k_len] the op's `flags` output (0/1), or nullptr when not wanted
  float* patch;           // [k_len] P = flags OR forced: 1.0 patched, 0.0 not (the row loops read it as is)
  float* scores;          // [k_len] the op's `scores` output (-inf where unattended), or nullptr
};

// Phase 2 for one batch item: heads[h] are that item's finished blocks (num_heads of them,
// matching w1's features_per_head * num_heads rows). A column is flagged when its score is above
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

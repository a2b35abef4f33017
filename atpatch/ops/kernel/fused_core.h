// The attention arithmetic of AtPatchAttention around the patch (spec.py), free of onnxruntime
// types: each query row's map row (scores, scale, bias, softmax) and its weighted values. The patch
// between them is core.h's, unchanged.
#pragma once

#include <cstdint>

namespace atpatch {

// Query rows are taken kQueryGroup at a time, and keys (value columns) kLaneBlock at a time, so
// that a block's sums stay in registers while the depth (keys) goes by.
constexpr int kQueryGroup = 4;
constexpr int kLaneBlock = 8;

// rows[i][k] = softmax_k(scale * sum_d query[i * query_stride + d] * key_t[d * k_len + k]
//                        + bias[i * bias_row_stride + k * bias_stride])
// for `count` query rows (1..kQueryGroup): the sum over d in order, then the scale, then the bias (as
// MatMul, Mul, Add and Softmax would), the softmax as exp(x - max) / sum. A row whose entries are all
// -inf gives NaN, as Softmax does. Rows are k_len apart in `rows`.
void attention_rows(int count, const float* query, int64_t query_stride, const float* key_t, int64_t depth,
                    int64_t k_len, float scale, const float* bias, int64_t bias_row_stride, int64_t bias_stride,
                    float* rows);

// out[i][e] = sum_k probs[i * k_len + k] * value[k * width + e] for `count` rows (1..kQueryGroup), the
// sum over k in order; out rows are width apart.
void weighted_values(int count, const float* probs, const float* value, int64_t k_len, int64_t width, float* out);

}  // namespace atpatch

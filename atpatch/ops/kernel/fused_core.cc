// Hot loops of AtPatchAttention (fused_core.h): register blocks of kQueryGroup rows x kLaneBlock
// lanes, so the sums stay in vector registers while the depth (keys) goes by.
#include "fused_core.h"

#include <cstdint>
#include <cstring>
#include <limits>


namespace atpatch {

#if !defined(__GNUC__)  // GCC and Clang both define it
#error "fused_core.cc uses GCC/Clang vector extensions: build the AtPatch library with GCC or Clang"
#endif

// The vector helpers below are inlined into each clone of the hot functions, never called across
// the ABI, so GCC's note that an AVX vector return changes it does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define ATPATCH_INLINE inline __attribute__((always_inline))

// Clones for Haswell and later (AVX2 with FMA: CMake builds this file with -ffp-contract=fast, so
// the multiply-adds fuse; the sums need not round as onnxruntime's MatMul does, which they cannot
// match anyway) next to the baseline; the loader picks.
#if defined(ATPATCH_TARGET_CLONES) && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define ATPATCH_HOT_FMA __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ATPATCH_HOT_FMA
#endif

namespace {

// Eight float lanes, as GCC and Clang's vector extensions give them: an AVX register in the
// x86-64-v3 clones, two SSE registers in the baseline ones. Loops over fixed-size arrays did not
// stay in registers (the compiler shuffled and spilled them), so the blocks are written with these;
// sixteen-lane vectors spilled too.
static_assert(kLaneBlock == 8, "the vector type holds kLaneBlock lanes");
typedef float Lanes __attribute__((vector_size(32)));
typedef int32_t IntLanes __attribute__((vector_size(32)));

ATPATCH_INLINE Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ATPATCH_INLINE void store(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }
ATPATCH_INLINE Lanes splat(float x) { return Lanes{} + x; }
ATPATCH_INLINE Lanes from_bits(IntLanes bits) {
  Lanes v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// exp(x) for x <= 0 (a score minus its row's largest), kLaneBlock at a time (std::exp is a call per
// entry, which cost more than the rest of the op): exp(r) * 2^n with n = round(x / ln 2),
// r = x - n ln 2 in [-ln2/2, ln2/2], a degree-6 polynomial for exp(r) (relative error ~1e-7, an
// ulp), and 2^n as two normal powers of two so that results down to the smallest subnormal come
// out as std::exp's do. Below -104 the result is 0, as it is in float32 (masked keys: -inf, or the
// lowest float a mask adds); NaN stays NaN.
ATPATCH_INLINE Lanes exp_nonpositive(Lanes x) {
  const Lanes kLog2e = splat(1.44269504088896341f), kLn2Hi = splat(0.693359375f), kLn2Lo = splat(-2.12194440e-4f);
  const Lanes kRound = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Lanes kLow = splat(-104.0f);
  const Lanes clamped = x > kLow ? x : kLow;  // NaN -> -104 here; restored below
  const Lanes n = (clamped * kLog2e + kRound) - kRound;
  const Lanes r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  const Lanes p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const IntLanes whole = __builtin_convertvector(n, IntLanes);  // -150..0
  const IntLanes half = whole / 2;
  const Lanes value = p * from_bits((half + 127) << 23) * from_bits((whole - half + 127) << 23);
  return x != x ? x : (x < kLow ? splat(0.0f) : value);
}

ATPATCH_INLINE float exp_nonpositive(float x) {
  float lanes[kLaneBlock] = {x};
  store(lanes, exp_nonpositive(load(lanes)));
  return lanes[0];
}

// scale, bias and softmax of one row of raw scores, in place; maxima and sums in kLaneBlock lanes.
ATPATCH_INLINE void softmax_row(float* row, int64_t k_len, float scale, const float* bias, int64_t bias_stride) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t blocked = k_len - k_len % kLaneBlock;
  for (int64_t k = 0; k < k_len; ++k) row[k] = row[k] * scale + bias[k * bias_stride];
  Lanes most = splat(kNegInf);
  for (int64_t k0 = 0; k0 < blocked; k0 += kLaneBlock) {
    const Lanes v = load(row + k0);
    most = v > most ? v : most;
  }
  float max = kNegInf;
  for (int j = 0; j < kLaneBlock; ++j) max = most[j] > max ? most[j] : max;
  for (int64_t k = blocked; k < k_len; ++k) max = row[k] > max ? row[k] : max;
  if (max == kNegInf) {
    // Every key masked (or NaN): Softmax gives NaN for the row; the patch treats NaN as masked.
    for (int64_t k = 0; k < k_len; ++k) row[k] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  Lanes sums = splat(0.0f);
  for (int64_t k0 = 0; k0 < blocked; k0 += kLaneBlock) {
    const Lanes e = exp_nonpositive(load(row + k0) - max);
    store(row + k0, e);
    sums += e;
  }
  float sum = 0.0f;
  for (int j = 0; j < kLaneBlock; ++j) sum += sums[j];
  for (int64_t k = blocked; k < k_len; ++k) {
    row[k] = exp_nonpositive(row[k] - max);
    sum += row[k];
  }
  for (int64_t k = 0; k < k_len; ++k) row[k] /= sum;
}

// R rows of scores: out[i * k_len + k] = sum_d query[i * query_stride + d] * key_t[d * k_len + k].
// Keys go two vectors at a time where they can (2R sums in flight, what two FMA units need), then
// one, then one by one.
template <int R>
ATPATCH_INLINE void score_rows(const float* query, int64_t query_stride, const float* key_t, int64_t depth,
                               int64_t k_len, float* out) {
  int64_t k0 = 0;
  for (; k0 + 2 * kLaneBlock <= k_len; k0 += 2 * kLaneBlock) {
    Lanes lo[R] = {}, hi[R] = {};
    for (int64_t d = 0; d < depth; ++d) {
      const Lanes keys_lo = load(key_t + d * k_len + k0), keys_hi = load(key_t + d * k_len + k0 + kLaneBlock);
      for (int i = 0; i < R; ++i) {
        const float a = query[i * query_stride + d];
        lo[i] += a * keys_lo;
        hi[i] += a * keys_hi;
      }
    }
    for (int i = 0; i < R; ++i) {
      store(out + i * k_len + k0, lo[i]);
      store(out + i * k_len + k0 + kLaneBlock, hi[i]);
    }
  }
  for (; k0 + kLaneBlock <= k_len; k0 += kLaneBlock) {
    Lanes acc[R] = {};
    for (int64_t d = 0; d < depth; ++d) {
      const Lanes keys = load(key_t + d * k_len + k0);
      for (int i = 0; i < R; ++i) acc[i] += query[i * query_stride + d] * keys;
    }
    for (int i = 0; i < R; ++i) store(out + i * k_len + k0, acc[i]);
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t k = k0; k < k_len; ++k) {
      float acc = 0.0f;
      for (int64_t d = 0; d < depth; ++d) acc += query[i * query_stride + d] * key_t[d * k_len + k];
      out[i * k_len + k] = acc;
    }
  }
}

// R rows of weighted values: out[i * width + e] = sum_k probs[i * k_len + k] * value[k * width + e],
// value columns two vectors at a time where they can, as score_rows takes keys.
template <int R>
ATPATCH_INLINE void value_rows(const float* probs, const float* value, int64_t k_len, int64_t width, float* out) {
  int64_t e0 = 0;
  for (; e0 + 2 * kLaneBlock <= width; e0 += 2 * kLaneBlock) {
    Lanes lo[R] = {}, hi[R] = {};
    for (int64_t k = 0; k < k_len; ++k) {
      const Lanes v_lo = load(value + k * width + e0), v_hi = load(value + k * width + e0 + kLaneBlock);
      for (int i = 0; i < R; ++i) {
        const float p = probs[i * k_len + k];
        lo[i] += p * v_lo;
        hi[i] += p * v_hi;
      }
    }
    for (int i = 0; i < R; ++i) {
      store(out + i * width + e0, lo[i]);
      store(out + i * width + e0 + kLaneBlock, hi[i]);
    }
  }
  for (; e0 + kLaneBlock <= width; e0 += kLaneBlock) {
    Lanes acc[R] = {};
    for (int64_t k = 0; k < k_len; ++k) {
      const Lanes v = load(value + k * width + e0);
      for (int i = 0; i < R; ++i) acc[i] += probs[i * k_len + k] * v;
    }
    for (int i = 0; i < R; ++i) store(out + i * width + e0, acc[i]);
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t e = e0; e < width; ++e) {
      float acc = 0.0f;
      for (int64_t k = 0; k < k_len; ++k) acc += probs[i * k_len + k] * value[k * width + e];
      out[i * width + e] = acc;
    }
  }
}

}  // namespace

ATPATCH_HOT_FMA void attention_rows(int count, const float* query, int64_t query_stride, const float* key_t, int64_t depth,
                                int64_t k_len, float scale, const float* bias, int64_t bias_row_stride,
                                int64_t bias_stride, float* rows) {
  if (count == kQueryGroup) {
    score_rows<kQueryGroup>(query, query_stride, key_t, depth, k_len, rows);
  } else {
    for (int i = 0; i < count; ++i) score_rows<1>(query + i * query_stride, 0, key_t, depth, k_len, rows + i * k_len);
  }
  for (int i = 0; i < count; ++i) softmax_row(rows + i * k_len, k_len, scale, bias + i * bias_row_stride, bias_stride);
}

ATPATCH_HOT_FMA void weighted_values(int count, const float* probs, const float* value, int64_t k_len, int64_t width,
                                 float* out) {
  if (count == kQueryGroup) {
    value_rows<kQueryGroup>(probs, value, k_len, width, out);
  } else {
    for (int i = 0; i < count; ++i) value_rows<1>(probs + i * k_len, value, k_len, width, out + i * width);
  }
}

}  // namespace atpatch

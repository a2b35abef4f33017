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

// R rows of a product: out[i * cols + j] = sum_t a[i * a_stride + t] * b[t * cols + j], t in order
// (the scores: query rows times key_t; the weighted values: probability rows times the values).
// Columns go two vectors at a time where they can (2R sums in flight, what two FMA units need),
// then one, then one by one.
template <int R>
ATPATCH_INLINE void product_rows(const float* a, int64_t a_stride, const float* b, int64_t inner, int64_t cols,
                                 float* out) {
  int64_t j0 = 0;
  for (; j0 + 2 * kLaneBlock <= cols; j0 += 2 * kLaneBlock) {
    Lanes lo[R] = {}, hi[R] = {};
    for (int64_t t = 0; t < inner; ++t) {
      const Lanes b_lo = load(b + t * cols + j0), b_hi = load(b + t * cols + j0 + kLaneBlock);
      for (int i = 0; i < R; ++i) {
        const float x = a[i * a_stride + t];
        lo[i] += x * b_lo;
        hi[i] += x * b_hi;
      }
    }
    for (int i = 0; i < R; ++i) {
      store(out + i * cols + j0, lo[i]);
      store(out + i * cols + j0 + kLaneBlock, hi[i]);
    }
  }
  for (; j0 + kLaneBlock <= cols; j0 += kLaneBlock) {
    Lanes acc[R] = {};
    for (int64_t t = 0; t < inner; ++t) {
      const Lanes lanes = load(b + t * cols + j0);
      for (int i = 0; i < R; ++i) acc[i] += a[i * a_stride + t] * lanes;
    }
    for (int i = 0; i < R; ++i) store(out + i * cols + j0, acc[i]);
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t j = j0; j < cols; ++j) {
      float acc = 0.0f;
      for (int64_t t = 0; t < inner; ++t) acc += a[i * a_stride + t] * b[t * cols + j];
      out[i * cols + j] = acc;
    }
  }
}

// `count` rows (1..kQueryGroup) of product_rows: four at once, or one by one.
ATPATCH_INLINE void product(int count, const float* a, int64_t a_stride, const float* b, int64_t inner, int64_t cols,
                            float* out) {
  if (count == kQueryGroup) {
    product_rows<kQueryGroup>(a, a_stride, b, inner, cols, out);
  } else {
    for (int i = 0; i < count; ++i) product_rows<1>(a + i * a_stride, 0, b, inner, cols, out + i * cols);
  }
}

}  // namespace

ATPATCH_HOT_FMA void attention_rows(int count, const float* query, int64_t query_stride, const float* key_t, int64_t depth,
                                int64_t k_len, float scale, const float* bias, int64_t bias_row_stride,
                                int64_t bias_stride, float* rows) {
  product(count, query, query_stride, key_t, depth, k_len, rows);
  for (int i = 0; i < count; ++i) softmax_row(rows + i * k_len, k_len, scale, bias + i * bias_row_stride, bias_stride);
}

ATPATCH_HOT_FMA void weighted_values(int count, const float* probs, const float* value, int64_t k_len, int64_t width,
                                 float* out) {
  product(count, probs, k_len, value, k_len, width, out);
}

}  // namespace atpatch

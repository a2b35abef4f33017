"""The AtPatch op contract: the single source of truth for every form of the op.

The numpy reference (`reference.py`), the ONNX function (`function.py`) and the native
kernels (C++ CPU, CUDA) all implement exactly this contract; tests check each against it.

Inputs
  attention  [batch, heads, q_len, k_len], float32 or float16: probabilities right
             after the attention softmax. Entries equal to 0 are treated as masked: 0 in the
             map's declared type (`map_type`), whatever type the op receives it in.
  w1         [FEATURES_PER_HEAD * heads, hidden] float32   detector: first layer
  b1         [hidden] float32
  w2         [hidden] float32                               detector: scoring layer
  b2         [1] float32
  forced     bool, [batch, k_len] or broadcastable to it ([1, 1], [batch, 1], [1, k_len]):
             key positions to patch whatever this layer's detector says (v2). Cross-layer
             patching passes here the positions flagged in any layer (rewrite/crosslayer.py).
Attributes
  threshold  float: a key column is flagged when its score is strictly greater.
  map_type   int (TensorProto element type): the type the model declares for `attention`; 0
             (default): the type the op receives. onnxruntime's CPU provider runs a float16 node
             whose neighbours run in float32 (it has no float16 Softmax or MatMul) in float32 as
             well, so the op can receive a float16 map unrounded. With map_type 10 (float16) the
             native kernel reads such values as the float16 map the model declares (rounded to
             nearest even: anything <= 2^-25 is 0, masked). Without it, a real token whose own
             entry underflows in float16 made a padding row in one form of the op and not in the
             other, and a row whose unflagged entries are float16 subnormals was patched from
             different values: on a tiny fp16 BERT the two forms' logits differed by up to 0.5 on
             6 of 100 random batches. The rewrite sets it for float16 maps; the function counts
             what rounds to 0 in its input's declared type as masked and patches from the map
             as declared, so it needs no attribute.
Outputs
  patched    same shape and type as `attention`.
  flags      [batch, k_len] bool (v2): the columns this layer's detector flags, among the
             columns some real query attends to (`forced` is not folded in).
  scores     [batch, k_len] float32 (v2, optional; nodes may leave it off): the detector's
             score of each column some real query attends to, -inf for the others. Cross-layer
             patching sums them over layers (rewrite/crosslayer.py, the joint rule): a trigger
             spread over several positions, or faintly anomalous in several layers, can pass
             every layer's own threshold and still stand out in the sum.

Real queries (v2). Query row q sits at key position c = k_len - q_len + q (the last q_len
  positions: a self-attention map, with or without a KV cache before it). The row is a
  padding query when its own entry attention[.., q, c] is masked (0): a padded token's key
  is masked in every row, its own included, while a real token always sees itself. Rows
  with c < 0 (more queries than keys: not self-attention) are real. Features and the
  "attended" test count real rows only, so a batch padded to any length gives every input
  the same features, flags and outputs (a padding row attends to the real keys like any
  other row, and counting it made the features, and so the flags, depend on the padding).
Column features (per batch item b and key column j), for each head h. Over the real rows q
where column j is unmasked (attention > 0), what the column receives:
    mass[h, j] = mean_q attention[q, j] * n_q   (n_q = unmasked entries in row q:
                 1.0 means the column gets exactly a uniform share, so the
                 value does not grow or shrink with sequence length)
    peak[h, j] = max_q attention[q, j]           (over real rows; 0 when none)
    top[h, j]  = fraction of those rows whose largest entry is at column j
  and, from the column's own query row o = j - (k_len - q_len) (when 0 <= o < q_len and that
  row is real; else all three are 0), how that token attends:
    self[h, j]  = attention[o, j] * n_o              (its weight on itself, uniform-relative)
    opeak[h, j] = max_k attention[o, k] * n_o        (how peaked its row is: 1 uniform .. n_o)
    ofocus[h, j] = sum_k attention[o, k]^2 * n_o     (how concentrated: 1 uniform .. n_o one-hot)
  A trigger token stands out as much by how it attends as by how it is attended to: on a
  from-scratch backdoored BERT, a layer's trigger columns flagged at a 0.5% clean flag rate
  went from 39% (first three features) to 86% (all six), measured (feature version 4).
  features[b, j] = (mass[0..H-1, j], peak[..], top[..], self[..], opeak[..], ofocus[..]):
  feature f of head h sits at index f * heads + h. Features are per head because a
  backdoor takes over particular heads; averaged over heads, its columns look like
  salient words.
Detector: score = w2 . relu(features @ w1 + b1) + b2;
  flags = score > threshold AND some real row of some head has column j unmasked.
Patch, with P = flags OR forced, per row (b, h, q), every row (padding rows too): let U be
  the unmasked entries, F those among them in P. If F is empty or F == U, the row is returned
  unchanged (bit-identical). Otherwise each entry in F gets the benign value m, the row's
  smallest entry outside F (what a column nobody singles out receives), and the row is
  renormalised to sum 1. In closed form, with S the sum of the entries outside F, k = |F|:
    entries in F      -> m / (S + k m)
    other unmasked    -> attention / (S + k m)
    masked entries    -> stay 0.
  (A uniform share 1/n as the benign value leaves a trigger enough weight to keep
  its effect: measured on a backdoored MiniLM, patching the true trigger column in
  every layer left 13% attack success with 1/n and 2.6% with m.)

Version 1 (models patched before v2 still run): inputs without `forced`, no `flags`
output, every query row counted, and the first three features only (feature version 2). Its ONNX
function travels in those files; the native kernels keep a v1 mode for them.
"""

from __future__ import annotations

__all__ = [
    "ATTRIBUTES",
    "DOMAIN",
    "FEATURE_NAMES",
    "FUSED_ATTRIBUTES",
    "FUSED_INPUTS",
    "FUSED_OP_TYPE",
    "FUSED_OUTPUTS",
    "FEATURE_VERSION",
    "INPUTS",
    "FEATURES_PER_HEAD",
    "MAX_IR_VERSION",
    "MAX_OPSET",
    "MIN_OPSET",
    "OP_TYPE",
    "OUTPUTS",
    "SUPPORTED_DTYPES",
    "VERSION",
    "num_features",
]

DOMAIN = "ai.atpatch"
OP_TYPE = "AtPatch"
VERSION = 2

INPUTS = ("attention", "w1", "b1", "w2", "b2", "forced")
OUTPUTS = ("patched", "flags", "scores")
# name -> (type, default)
ATTRIBUTES: dict[str, tuple[type, float | int]] = {"threshold": (float, 0.0), "map_type": (int, 0)}

FUSED_OP_TYPE = "AtPatchAttention"
FUSED_INPUTS = ("query", "key_t", "bias", "value", *INPUTS[1:])
FUSED_OUTPUTS = ("output", "flags", "scores")
FUSED_ATTRIBUTES: dict[str, tuple[type, float | int]] = {"scale": (float, 1.0), "threshold": (float, 0.0)}

FEATURE_VERSION = 4  # 4: own-row features (op v2); 2: every row, first three features (op v1)
FEATURE_NAMES = ("mass", "peak", "top", "self", "opeak", "ofocus")  # each per head
FEATURES_PER_HEAD = len(FEATURE_NAMES)


def num_features(heads: int) -> int:
    """Rows of w1 for a layer with `heads` attention heads."""
    return FEATURES_PER_HEAD * heads


SUPPORTED_DTYPES = ("float32", "float16")

# The ONNX function is written in the model's own ai.onnx opset (a function must
# share the model's opset version); CastLike needs 15.
MIN_OPSET = 15
MAX_OPSET = 26  # onnxruntime 1.31's limit
MAX_IR_VERSION = 13  # likewise

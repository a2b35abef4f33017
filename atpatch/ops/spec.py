"""The AtPatch op contract: the single source of truth for every form of the op.

The numpy reference (`reference.py`), the ONNX function (`function.py`) and the
native kernel all implement exactly this contract; tests check each against it.

Inputs
  attention  [batch, heads, q_len, k_len], float32 or float16: probabilities right
             after the attention softmax. Entries equal to 0 are treated as masked.
  w1         [NUM_FEATURES, hidden] float32  detector: first layer
  b1         [hidden] float32
  w2         [hidden] float32                detector: scoring layer
  b2         [1] float32
Attributes
  threshold  float: a key column is flagged when its score is strictly greater.
Output
  patched    same shape and type as `attention`.

Column features (per batch item b and key column j, feature order fixed here):
  for each head h, over the rows q where column j is unmasked (attention > 0):
    mass[h, j] = mean_q attention[q, j] * n_q   (n_q = unmasked entries in row q:
                 1.0 means the column gets exactly a uniform share, so the
                 value does not grow or shrink with sequence length)
    peak[h, j] = max_q attention[q, j]
    top[h, j]  = fraction of those rows whose largest entry is at column j
  features[b, j] = (mean_h mass, max_h mass, mean_h peak, mean_h top)
Detector: score = w2 . relu(features @ w1 + b1) + b2; flagged = score > threshold.
Patch, per row (b, h, q): let U be the unmasked entries, F the flagged ones among
  them. If F is empty or F == U, the row is returned unchanged (bit-identical).
  Otherwise each flagged entry gets the row's mean unflagged value, and the row is
  renormalised to sum 1; in closed form, with n = |U|, n_u = |U - F| and
  S = sum of the unflagged entries:
    flagged entries   -> 1 / n
    unflagged entries -> attention * (n_u / (n * S))
    masked entries    -> stay 0.
"""

from __future__ import annotations

__all__ = [
    "ATTRIBUTES",
    "DOMAIN",
    "FEATURE_NAMES",
    "FEATURE_VERSION",
    "INPUTS",
    "NUM_FEATURES",
    "MAX_IR_VERSION",
    "MAX_OPSET",
    "MIN_OPSET",
    "OP_TYPE",
    "OUTPUTS",
    "SUPPORTED_DTYPES",
    "VERSION",
]

DOMAIN = "ai.atpatch"
OP_TYPE = "AtPatch"
VERSION = 1

INPUTS = ("attention", "w1", "b1", "w2", "b2")
OUTPUTS = ("patched",)
# name -> (type, default)
ATTRIBUTES: dict[str, tuple[type, float]] = {"threshold": (float, 0.0)}

FEATURE_VERSION = 1
FEATURE_NAMES = ("mass_mean", "mass_max", "peak_mean", "top_mean")
NUM_FEATURES = len(FEATURE_NAMES)

SUPPORTED_DTYPES = ("float32", "float16")

# The ONNX function is written in the model's own ai.onnx opset (a function must
# share the model's opset version); CastLike needs 15.
MIN_OPSET = 15
MAX_OPSET = 26  # onnxruntime 1.31's limit
MAX_IR_VERSION = 13  # likewise

"""Numpy reference of the AtPatch op: the oracle every other form is tested against.

Readable first, fast second. See `spec.py` for the contract in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LayerDetector",
    "atpatch",
    "atpatch_attention",
    "attended_columns",
    "column_features",
    "column_scores",
    "feature_scores",
    "flag_columns",
    "patch_columns",
    "real_queries",
    "scores_output",
]


@dataclass(frozen=True)
class LayerDetector:
    """One attention layer's detector: an MLP with one hidden ReLU layer, and a threshold."""

    w1: np.ndarray  # [FEATURES_PER_HEAD * heads, hidden]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [hidden]
    b2: np.ndarray  # [1]
    threshold: float


def _as_map(attention: np.ndarray) -> np.ndarray:
    a = np.asarray(attention, dtype=np.float32)
    if a.ndim != 4:
        raise ValueError(f"attention must be [batch, heads, q_len, k_len], got shape {a.shape}")
    return a


def real_queries(attention: np.ndarray) -> np.ndarray:
    """[batch, heads, q_len] bool: rows that are not padding queries (spec.py, "Real queries").

    Row q sits at key position k_len - q_len + q; it is a padding query when its own entry is masked.
    """
    a = _as_map(attention)
    q_len, k_len = a.shape[-2:]
    own = k_len - q_len + np.arange(q_len)
    real = np.ones(a.shape[:3], dtype=bool)
    inside = own >= 0
    real[..., inside] = a[..., np.flatnonzero(inside), own[inside]] > 0
    return real


def column_features(attention: np.ndarray) -> np.ndarray:
    """Length- and padding-invariant features of each key column: [batch, k_len, FEATURES_PER_HEAD * heads]."""
    a = _as_map(attention)
    q_len, k_len = a.shape[-2:]
    rows = real_queries(a)[..., None]  # [B, H, Q, 1]
    valid = (a > 0) & rows
    row_support = (a > 0).sum(axis=-1, keepdims=True, dtype=np.float32)  # n_q
    col_rows = np.maximum(valid.sum(axis=-2, dtype=np.float32), 1.0)  # [B,H,K]
    mass = np.where(rows, a * row_support, 0.0).sum(axis=-2) / col_rows
    peak = np.where(rows, a, 0.0).max(axis=-2, initial=0.0)
    row_max = a.max(axis=-1, keepdims=True, initial=0.0)
    top = ((a >= row_max) & valid).sum(axis=-2, dtype=np.float32) / col_rows
    # The column's own query row o = j - (k_len - q_len), where that row is in this map and real.
    own = np.zeros((*a.shape[:2], 3, k_len), np.float32)  # self, opeak, ofocus
    offset = k_len - q_len
    for o in range(max(0, -offset), q_len):
        j, row, n = o + offset, a[:, :, o, :], row_support[:, :, o, 0]
        real = rows[:, :, o, 0]
        own[:, :, 0, j] = np.where(real, row[..., j] * n, 0.0)
        own[:, :, 1, j] = np.where(real, row_max[:, :, o, 0] * n, 0.0)
        own[:, :, 2, j] = np.where(real, (row * row).sum(axis=-1) * n, 0.0)
    features = np.concatenate([mass, peak, top, own[:, :, 0], own[:, :, 1], own[:, :, 2]], axis=1)
    return np.ascontiguousarray(features.transpose(0, 2, 1), dtype=np.float32)  # [B, K, 6H]: feature-major, then head


def attended_columns(attention: np.ndarray) -> np.ndarray:
    """[batch, k_len] bool: columns that some real query of some head attends to (is unmasked in)."""
    a = _as_map(attention)
    return ((a > 0) & real_queries(a)[..., None]).any(axis=(1, 2))


def column_scores(attention: np.ndarray, detector: LayerDetector) -> np.ndarray:
    """Detector scores of each key column: [batch, k_len]."""
    features = column_features(attention)
    if features.shape[-1] != detector.w1.shape[0]:
        raise ValueError(
            f"the detector expects {detector.w1.shape[0]} features per column, this map of "
            f"{attention.shape[1]} heads gives {features.shape[-1]}; fit a detector for this model"
        )
    return feature_scores(features, detector)


def feature_scores(features: np.ndarray, detector: LayerDetector) -> np.ndarray:
    """The detector's MLP on column features [..., FEATURES_PER_HEAD * heads]: scores [...]."""
    hidden = np.maximum(features @ detector.w1 + detector.b1, 0.0)
    return (hidden @ detector.w2 + detector.b2).astype(np.float32)


def scores_output(attention: np.ndarray, detector: LayerDetector) -> np.ndarray:
    """The op's `scores` output: [batch, k_len] float32, -inf where no real query attends."""
    return np.where(attended_columns(attention), column_scores(attention, detector), -np.inf).astype(np.float32)


def flag_columns(attention: np.ndarray, detector: LayerDetector) -> np.ndarray:
    """The op's `flags` output: [batch, k_len] bool, flagged columns that some real query attends to."""
    return (column_scores(attention, detector) > detector.threshold) & attended_columns(attention)


def atpatch(
    attention: np.ndarray, detector: LayerDetector, forced: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The op: (patched map of the input's dtype, flags [batch, k_len]); `forced` broadcasts to [batch, k_len]."""
    flags = flag_columns(attention, detector)
    patch = flags if forced is None else flags | np.broadcast_to(np.asarray(forced, dtype=bool), flags.shape)
    return patch_columns(attention, patch), flags


def patch_columns(attention: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """Replace the flagged key columns ([batch, k_len] bool) of every row; see spec.py."""
    a = np.asarray(attention, dtype=np.float32)
    valid = a > 0
    hit = valid & flagged[:, None, None, :]
    kept = valid & ~hit
    n_hit = hit.sum(axis=-1, keepdims=True, dtype=np.float32)
    kept_sum = np.where(kept, a, 0.0).sum(axis=-1, keepdims=True, dtype=np.float32)
    benign = np.where(kept, a, np.inf).min(axis=-1, keepdims=True)  # the smallest unflagged entry
    change = (n_hit > 0) & kept.any(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        total = kept_sum + n_hit * benign
        patched = np.where(hit, benign / total, np.where(kept, a / total, 0.0)).astype(np.float32)
    out = np.where(change, patched.astype(attention.dtype), attention)
    return out.astype(attention.dtype)


def atpatch_attention(
    query: np.ndarray,
    key_t: np.ndarray,
    bias: np.ndarray,
    value: np.ndarray,
    detector: LayerDetector,
    forced: np.ndarray,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fused op AtPatchAttention (spec.py): (output, flags, scores), in float32."""
    scores = np.matmul(query.astype(np.float32), key_t.astype(np.float32)) * np.float32(scale) + bias
    shifted = scores - scores.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        exp = np.exp(shifted)
        attention = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    patched, flags = atpatch(attention, detector, forced)
    with np.errstate(invalid="ignore"):  # a row of NaN (every key at -inf) stays NaN, as in onnxruntime
        output = np.matmul(patched, value.astype(np.float32))
    return output, flags, scores_output(attention, detector)

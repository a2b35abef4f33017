"""Numpy reference of the AtPatch op: the oracle every other form is tested against.

Readable first, fast second. See `spec.py` for the contract in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LayerDetector", "atpatch", "column_features", "column_scores", "feature_scores", "patch_columns"]


@dataclass(frozen=True)
class LayerDetector:
    """One attention layer's detector: an MLP with one hidden ReLU layer, and a threshold."""

    w1: np.ndarray  # [FEATURES_PER_HEAD * heads, hidden]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [hidden]
    b2: np.ndarray  # [1]
    threshold: float


def column_features(attention: np.ndarray) -> np.ndarray:
    """Length-invariant features of each key column: [batch, k_len, FEATURES_PER_HEAD * heads]."""
    a = np.asarray(attention, dtype=np.float32)
    if a.ndim != 4:
        raise ValueError(f"attention must be [batch, heads, q_len, k_len], got shape {a.shape}")
    valid = a > 0
    row_support = valid.sum(axis=-1, keepdims=True, dtype=np.float32)  # n_q
    col_rows = np.maximum(valid.sum(axis=-2, dtype=np.float32), 1.0)  # [B,H,K]
    mass = (a * row_support).sum(axis=-2) / col_rows
    peak = a.max(axis=-2, initial=0.0)
    row_max = a.max(axis=-1, keepdims=True, initial=0.0)
    top = ((a >= row_max) & valid).sum(axis=-2, dtype=np.float32) / col_rows
    features = np.concatenate([mass, peak, top], axis=1)  # [B, 3H, K]: feature-major, then head
    return np.ascontiguousarray(features.transpose(0, 2, 1), dtype=np.float32)


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


def atpatch(attention: np.ndarray, detector: LayerDetector) -> np.ndarray:
    """Patch one layer's attention map; returns a new array of the input's dtype."""
    flagged = column_scores(attention, detector) > detector.threshold  # [B,K]
    return patch_columns(attention, flagged)


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

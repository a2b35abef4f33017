"""The joint rule: one score per key position over every layer, for triggers no single layer flags.

Each layer's detector is calibrated on its own, so a trigger that is faintly anomalous in several
layers, or spread over neighbouring positions (an image patch straddling two or four patches, a
phrase of several tokens), can stay under every layer's threshold. The joint rule sums the layers'
column scores (the op's `scores` output), each weighted by the inverse of its spread on clean
columns, and averages the sum over neighbour windows: `window` 2 takes pairs of positions along a
sequence, or 2 x 2 blocks of an image's patch grid, and each position keeps the best window that
holds it. A position is flagged when that score is above the threshold; cross-layer patching then
patches it in every layer, like any other flag.

Position 0 of a sequence, and the positions before an image's patch grid ([CLS], a distillation
token), are never flagged by this rule: a model's attention sinks stand out in every input, and
patching them is not a fix. The grid is G x G patches after `lead` = K - G^2 special positions,
G = floor(sqrt(K)), as `rewrite/crosslayer.py` reads it.

This module is the numpy form (calibration, tests); `rewrite/crosslayer.py` builds the same in ONNX.
Measured first by `benchmarks/joint_detection.py` (no patching): at a 0.5% clean budget, on a ViT
whose trigger sits at a random place, the pooled sum flagged 74% of triggered images against 48%
for per-layer thresholds, and every trigger patch of 70% against 23%.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Confirm",
    "JointRule",
    "candidates",
    "grid_lead",
    "joint_flags",
    "joint_scores",
    "patch_grid",
    "pool",
    "WINDOWS",
]

WINDOWS = (1, 2)  # 1: each position alone; 2: pairs along a sequence, 2 x 2 on a patch grid


@dataclass(frozen=True)
class JointRule:
    """Per layer a weight (>= 0; 0 leaves the layer out), one threshold, the window (WINDOWS)."""

    weights: tuple[float, ...]
    threshold: float
    window: int = 1

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
            raise ValueError(f"joint weights must be finite, >= 0 and not all 0, one per layer; got {self.weights}")
        if self.window not in WINDOWS:
            raise ValueError(f"joint window must be one of {WINDOWS}, got {self.window!r}")
        if not np.isfinite(self.threshold):
            raise ValueError(f"joint threshold must be a finite number, got {self.threshold!r}")


BLOCKS = (1, 2)  # windows the effect check patches together: its best, or its two best


@dataclass(frozen=True)
class Confirm:
    """The effect check (rewrite/confirm.py): an input nothing flags, predicted `label` (the class the
    misbehaving inputs went to), whose best position scores at least `threshold` on the joint score of
    `weights` and `window`, has that position (its best window's; with `blocks` 2, the next best
    window's too) patched in every layer in the second pass; the patched outputs are kept only where the
    predicted class changes and the logit of `label` falls by at least `drop` (0: any change counts),
    the original's elsewhere. A trigger whose columns look like clean ones to the layers is still the
    column the model leans on, and removing it takes the label's logit down far, where a clean image
    near a class boundary moves a little."""

    label: int
    threshold: float
    weights: tuple[float, ...]
    window: int = 1
    drop: float = 0.0
    blocks: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.label, int) or isinstance(self.label, bool) or self.label < 0:
            raise ValueError(f"the effect check's label must be a class index >= 0, got {self.label!r}")
        if not np.isfinite(self.drop) or self.drop < 0:
            raise ValueError(f"the effect check's drop must be a finite number >= 0, got {self.drop!r}")
        if self.blocks not in BLOCKS:
            raise ValueError(f"the effect check patches {' or '.join(map(str, BLOCKS))} windows, got {self.blocks!r}")
        JointRule(self.weights, self.threshold, self.window)  # the same checks

    @property
    def rule(self) -> JointRule:
        return JointRule(self.weights, self.threshold, self.window)


def patch_grid(k_len: int) -> tuple[int, int]:
    """(lead, G): the special positions before an image's G x G patch grid, and G = floor(sqrt(k_len))."""
    side = int(np.floor(np.sqrt(k_len)))
    return k_len - side * side, side


def grid_lead(k_len: int) -> int:
    """Special positions before an image's G x G patch grid, G = floor(sqrt(k_len))."""
    return patch_grid(k_len)[0]


def pool(x: np.ndarray, grid: bool) -> np.ndarray:
    """Each position's best mean over the windows of 2 (2 x 2 on a grid) that hold it; -inf where none."""
    n, k = x.shape
    if grid:
        lead, side = patch_grid(k)
        g = x[:, lead:].reshape(n, side, side)
        win = (g[:, :-1, :-1] + g[:, 1:, :-1] + g[:, :-1, 1:] + g[:, 1:, 1:]) / 4
        pad = np.pad(win, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        best = np.maximum.reduce([pad[:, 1:, 1:], pad[:, :-1, 1:], pad[:, 1:, :-1], pad[:, :-1, :-1]])
        return np.concatenate([x[:, :lead], best.reshape(n, -1)], 1)
    win = (x[:, :-1] + x[:, 1:]) / 2
    edge = np.full((n, 1), -np.inf, x.dtype)
    return np.maximum(np.concatenate([edge, win], 1), np.concatenate([win, edge], 1))


def joint_scores(scores: Sequence[np.ndarray], rule: JointRule, grid: bool) -> np.ndarray:
    """[batch, k_len] float32: the rule's score of each position from the layers' `scores` outputs
    ([batch, k_len] each, -inf where unattended); -inf where the rule never flags."""
    if len(scores) != len(rule.weights):
        raise ValueError(f"{len(scores)} layers of scores for a joint rule over {len(rule.weights)}")
    used = [(np.asarray(s, np.float32), np.float32(w)) for s, w in zip(scores, rule.weights, strict=True) if w > 0]
    total = used[0][0] * used[0][1]
    for s, w in used[1:]:
        total = total + s * w
    pooled = pool(total, grid) if rule.window == 2 else total
    pooled = pooled.astype(np.float32)
    pooled[:, : grid_lead(pooled.shape[1]) if grid else 1] = -np.inf  # sinks, [CLS]: never this rule's
    return pooled


def joint_flags(scores: Sequence[np.ndarray], rule: JointRule, grid: bool) -> np.ndarray:
    """[batch, k_len] bool: the positions the rule flags."""
    return joint_scores(scores, rule, grid) > np.float32(rule.threshold)


def candidates(scores: Sequence[np.ndarray], confirm: Confirm, grid: bool) -> tuple[np.ndarray, np.ndarray]:
    """([batch] float32, [batch, k_len] bool): each input's best joint score under `confirm`, and the
    positions holding it (the best window's) where that score reaches the threshold; the caller keeps
    the inputs predicted `confirm.label` and flagged nowhere. With `confirm.blocks` 2, also the positions
    holding the best score outside the best window: the best other window's positions not in the first
    (a position's joint score is that of the best window holding it), so the two windows' union."""
    s = joint_scores(scores, confirm.rule, grid)
    top = s.max(axis=1)
    where = s == top[:, None]
    if confirm.blocks == 2:
        rest = np.where(where, np.float32(-np.inf), s)
        where |= (rest == rest.max(axis=1, keepdims=True)) & np.isfinite(rest)
    return top, where & (top >= np.float32(confirm.threshold))[:, None]


def kept(first: np.ndarray, second: np.ndarray, confirm: Confirm) -> np.ndarray:
    """bool [batch]: where a tried input keeps pass 2's `second` logits over pass 1's `first` ([batch,
    classes]): its predicted class changed and, with `confirm.drop` > 0, the label's logit fell by that."""
    changed = second.argmax(axis=1) != first.argmax(axis=1)
    if confirm.drop > 0:
        fall = first[:, confirm.label].astype(np.float32) - second[:, confirm.label].astype(np.float32)
        changed &= fall >= np.float32(confirm.drop)
    return changed

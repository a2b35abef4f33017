"""Fitting the joint rule (ops/joint.py) and spending the clean-flag budget on it and the layers together.

The rule's weights are each layer's inverse spread of scores on clean columns (so every layer
counts in units of its own noise); its threshold is one more rank in calibrate.py's allocation,
which gives the count to whichever of the layers and the rule flag the most culprits per clean
input spent. The window (each position alone, or neighbour pairs / 2 x 2 blocks) is the one whose
candidate's allocation flags the most culprits, or, in `atpatch fit`, whose patched model fixes the
most misbehaving inputs. When no allocation with the rule flags more culprits than the layers
alone, the rule is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ops.joint import WINDOWS, JointRule, joint_scores
from ..ops.reference import LayerDetector, feature_scores
from .calibrate import FlagBudget, allocate, allowed_flags, calibrate
from .columns import ColumnSet

__all__ = ["Calibrated", "dense_scores", "joint_candidates", "joint_weights"]


def dense_scores(columns: ColumnSet, layers: list[LayerDetector], n_inputs: int) -> list[np.ndarray]:
    """Per layer, [n_inputs, key positions] float32: each column's score, -inf where the set has no column
    (as the op's `scores` output gives an unattended one)."""
    keys = int(columns.position.max(initial=-1)) + 1
    out = []
    for features, detector in zip(columns.features, layers, strict=True):
        dense = np.full((n_inputs, keys), -np.inf, np.float32)
        dense[columns.example, columns.position] = feature_scores(features, detector)
        out.append(dense)
    return out


def joint_weights(benign: ColumnSet, layers: list[LayerDetector]) -> tuple[float, ...] | None:
    """1 / (each layer's standard deviation of scores over benign columns); 0 for a layer whose scores do
    not vary; None when none varies."""
    spreads = [
        float(np.std(feature_scores(f, d).astype(np.float64))) for f, d in zip(benign.features, layers, strict=True)
    ]
    weights = tuple(1.0 / s if s > 1e-6 else 0.0 for s in spreads)
    return weights if any(w > 0 for w in weights) else None


@dataclass(frozen=True)
class Calibrated:
    """Thresholds for the layers, the joint rule (None: left out), and the culprits they flag within
    the count (calibrate.FlagBudget.gain: culprit columns, each misbehaving input counting once)."""

    layers: list[LayerDetector]
    joint: JointRule | None
    gain: float


def joint_candidates(
    layers: list[LayerDetector],
    calibration: ColumnSet,
    n_inputs: int,
    target_flag_rate: float,
    culprits: ColumnSet | None,
    benign: ColumnSet | None,
    grid: bool,
) -> list[Calibrated]:
    """calibrate.calibrate's thresholds first, then, per window, the allocation over the layers and the
    joint rule together where it uses the rule and flags more culprits than the layers alone.
    `benign` (the clean columns the rule's weights come from) None: the layers' thresholds only."""
    alone = calibrate(layers, calibration, n_inputs, target_flag_rate, culprits)
    weights = None if benign is None else joint_weights(benign, layers)
    if weights is None or culprits is None or not culprits.positive.any():
        return [Calibrated(alone, None, 0.0)]
    base = FlagBudget(layers, calibration, n_inputs, culprits)
    covered = np.any([p > d.threshold for p, d in zip(base.positive, alone, strict=True)], axis=0)
    out = [Calibrated(alone, None, float(base.weight[covered].sum()))]
    allowed = allowed_flags(n_inputs, target_flag_rate)
    cal_dense = dense_scores(calibration, layers, n_inputs)
    bad_dense = dense_scores(culprits, layers, int(culprits.example.max()) + 1)
    hit = culprits.positive
    for window in WINDOWS:
        rule = JointRule(weights, 0.0, window)
        per_input = joint_scores(cal_dense, rule, grid).max(axis=1, initial=-np.inf)
        positive = joint_scores(bad_dense, rule, grid)[culprits.example[hit], culprits.position[hit]]
        budget = base.with_rule(per_input, positive)
        ranks = allocate(budget, len(layers) + 1, allowed)
        gain = budget.gain(ranks)
        if ranks[-1] < 0 or gain <= out[0].gain + 1e-9:
            continue
        thresholds = [budget.threshold(i, r) for i, r in enumerate(ranks)]
        fitted = [LayerDetector(d.w1, d.b1, d.w2, d.b2, t) for d, t in zip(layers, thresholds, strict=False)]
        out.append(Calibrated(fitted, JointRule(weights, thresholds[-1], window), gain))
    return out

"""Calibrating the detector's thresholds on held-out clean inputs, and spending the flag budget.

With 90% confidence, at most a target share of unseen clean inputs may get any flagged column
(in any layer: cross-layer patching then patches it everywhere). Where misbehaving inputs with
culprit columns are known, that budget goes to the layers whose detector separates culprits: a
layer that separates nothing is switched off and costs nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np

from ..ops.reference import LayerDetector, feature_scores
from .columns import ColumnSet

__all__ = [
    "CONFIDENCE",
    "FlagBudget",
    "NEVER",
    "allocate",
    "allowed_flags",
    "calibrate",
    "calibration_note",
    "calibration_size_needed",
    "flag_rate_bound",
    "flag_rate_interval",
    "max_score_per_input",
]

CONFIDENCE = 0.9  # how sure calibration is that unseen clean inputs stay within the target
# The threshold of a switched-off layer: no finite score exceeds it, and it stays a plain JSON number.
NEVER = float(np.finfo(np.float32).max)


def max_score_per_input(columns: ColumnSet, layer: int, detector: LayerDetector, n_inputs: int) -> np.ndarray:
    scores = feature_scores(columns.features[layer], detector)
    best = np.full(n_inputs, -np.inf, dtype=np.float32)
    np.maximum.at(best, columns.example, scores)
    return best


def flag_rate_bound(flagged: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on the true flag rate after `flagged` of `n` inputs."""
    if flagged >= n:
        return 1.0
    ks = np.arange(flagged + 1)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in ks])

    def cdf(p: float) -> float:  # P(X <= flagged) for X ~ Binomial(n, p)
        return float(np.exp(log_choose + ks * np.log(p) + (n - ks) * np.log1p(-p)).sum())

    lo, hi = flagged / n, 1.0
    for _ in range(60):  # bisection: cdf falls as p grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - confidence else (lo, mid)
    return hi


def flag_rate_interval(flagged: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of the true flag rate after `flagged` of `n` inputs."""
    tail = 1 - (1 - confidence) / 2
    low = 0.0 if flagged == 0 else 1 - flag_rate_bound(n - flagged, n, tail)
    return low, flag_rate_bound(flagged, n, tail)


def allowed_flags(n: int, target_flag_rate: float, confidence: float = CONFIDENCE) -> int:
    """The most of `n` calibration inputs that may be flagged while the bound stays within the
    target; 0 when even none is not enough (the set is too small to show the target)."""
    allowed = 0
    while allowed < n and flag_rate_bound(allowed + 1, n, confidence) <= target_flag_rate:
        allowed += 1
    return allowed


def calibration_size_needed(target_flag_rate: float, layers: int = 1, confidence: float = CONFIDENCE) -> int:
    """The fewest calibration inputs with which `calibrate` can show the target for `layers` layers."""
    n = 1
    while flag_rate_bound(layers - 1, n, confidence) > target_flag_rate:
        n *= 2
    lo, hi = n // 2, n  # the bound falls as n grows: bisect for the first n that shows it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if flag_rate_bound(layers - 1, mid, confidence) <= target_flag_rate else (mid, hi)
    return max(hi, layers)


# Relative difference below which two detector scores count as the same (float32 rounding of the
# kernel, the ONNX function and numpy differ by about 1e-6 relative).
TIE_TOLERANCE = 1e-5


class FlagBudget:
    """Per layer, a rank r (flag the r highest-scoring calibration inputs; -1: the layer is off), and
    what a choice of ranks costs (calibration inputs flagged, plus one per active layer beyond the
    first) and buys (culprit columns flagged in some layer, each misbehaving input counting once)."""

    def __init__(self, layers: list[LayerDetector], calibration: ColumnSet, n: int, culprits: ColumnSet | None) -> None:
        self.n = n
        self.scores = [max_score_per_input(calibration, i, d, n) for i, d in enumerate(layers)]
        self.ranked = [np.sort(s)[::-1] for s in self.scores]
        self.positive: list[np.ndarray] = []
        self.weight = np.zeros(0, np.float32)
        if culprits is not None and culprits.positive.any():
            self.positive = [
                feature_scores(f[culprits.positive], d) for f, d in zip(culprits.features, layers, strict=True)
            ]
            owner = culprits.example[culprits.positive]
            _, index, counts = np.unique(owner, return_inverse=True, return_counts=True)
            self.weight = (1.0 / counts[index]).astype(np.float32)

    def with_rule(self, per_input: np.ndarray, positive: np.ndarray) -> FlagBudget:
        """A copy with one more rule to spend the count on, beside the layers (whose scores it shares):
        the rule's highest score per calibration input, and its scores of the culprit columns."""
        out = copy.copy(self)
        out.scores = [*self.scores, per_input.astype(np.float32)]
        out.ranked = [*self.ranked, np.sort(out.scores[-1])[::-1]]
        out.positive = [*self.positive, positive.astype(np.float32)] if len(self.weight) else self.positive
        return out

    def threshold(self, layer: int, rank: int) -> float:
        if rank < 0:
            return NEVER
        # Halfway between the highest score that must not be flagged and the lowest that is (above the top
        # score by half the gap below it, for rank 0). Just above the former, the op's own float32 rounding
        # flagged that calibration input too: 6 of 2000 where fit counted 5, on a MiniLM. Unseen inputs land
        # anywhere in the gap, so the middle keeps the conformal bound and flags no more of them.
        # Scores within float32 rounding of each other (TIE_TOLERANCE) are one score: tabular rows repeat,
        # and a threshold on such a tie (1 ulp above it) left the kernel and the ONNX function flagging
        # 8 of 1,000 COMPAS test rows differently (logits up to 2.8 apart). A tie across the cut is left
        # unflagged, so at most `rank` calibration inputs are flagged (fewer, when the cut splits a tie).
        ranked = self.ranked[layer]
        low = np.float32(ranked[min(rank, self.n - 1)])
        if not np.isfinite(low):
            return float(low)
        tie = np.float32(TIE_TOLERANCE * max(1.0, abs(float(low))))
        flagged = ranked[: min(rank, self.n)]
        above = flagged[np.isfinite(flagged) & (flagged > low + tie)]
        if len(above):
            high = np.float32(above[-1])
        else:  # nothing to flag clear of the tie: above it by the gap below it (1 when there is none)
            below = ranked[np.isfinite(ranked) & (ranked < low - tie)]
            high = np.float32(low + (low - below[0] if len(below) else max(1.0, abs(float(low)))))
        middle = np.float32(low + (high - low) / 2)
        return float(middle if np.isfinite(middle) and middle > low else np.nextafter(low, np.float32(np.inf)))

    def margin(self, layer: int, rank: int) -> float:
        """How far the culprits clear the layer's threshold at `rank`: their 10th-percentile score above
        it, in standard deviations of the calibration inputs' scores. Between layers that flag the same
        culprits at the same cost, the wider margin is the one unseen triggers, scattered around the
        debugging set's, still clear: on a held-out MiniLM case three layers flagged every culprit, and
        the first of them (margin 13) flagged 99.5% of the victims' triggers, the widest (39) all."""
        if not len(self.weight):
            return 0.0
        clean = self.scores[layer][np.isfinite(self.scores[layer])]
        spread = float(np.std(clean.astype(np.float64))) if len(clean) else 0.0
        lowest = float(np.percentile(self.positive[layer].astype(np.float64), 10))
        return (lowest - self.threshold(layer, rank)) / (spread if spread > 1e-12 else 1.0)

    def cost(self, ranks: Sequence[int]) -> int:
        active = [i for i, r in enumerate(ranks) if r >= 0]
        if not active:
            return 0
        flagged = np.any([self.scores[i] > self.threshold(i, ranks[i]) for i in active], axis=0)
        return int(flagged.sum()) + len(active) - 1

    def gain(self, ranks: Sequence[int]) -> float:
        active = [i for i, r in enumerate(ranks) if r >= 0]
        if not active or not len(self.weight):
            return 0.0
        covered = np.any([self.positive[i] > self.threshold(i, ranks[i]) for i in active], axis=0)
        return float(self.weight[covered].sum())


def allocate(budget: FlagBudget, layers: int, allowed: int) -> list[int]:
    """Greedy: each step takes the change of one layer's rank with the most culprits gained per
    calibration input spent (on ties, the widest margin: FlagBudget.margin); then what is left goes to
    the layers already on, one rank at a time (the debugging set's culprits score higher than unseen
    ones, so lower thresholds still help)."""
    ranks = [-1] * layers
    gain, cost = 0.0, 0
    while True:
        best: tuple[float, float, float, list[int], int] | None = None
        for layer in range(layers):
            for rank in range(ranks[layer] + 1, allowed + 1):
                trial = [*ranks[:layer], rank, *ranks[layer + 1 :]]
                c = budget.cost(trial)
                if c > allowed:
                    break  # the cost only grows with the rank
                g = budget.gain(trial) - gain
                if g <= 1e-9:
                    continue
                value = g / (c - cost + 0.1)
                if best is None or (value, g) >= (best[0], best[1]):
                    m = budget.margin(layer, rank)
                    if best is None or (value, g, m) > best[:3]:
                        best = (value, g, m, trial, c)
        if best is None:
            break
        _, g, _, ranks, cost = best
        gain += g
    grew = True
    while grew:
        grew = False
        for layer in (i for i, r in enumerate(ranks) if r >= 0):
            trial = [*ranks[:layer], ranks[layer] + 1, *ranks[layer + 1 :]]
            if ranks[layer] < allowed and budget.cost(trial) <= allowed:
                ranks, grew = trial, True
    return ranks


def calibrate(
    layers: list[LayerDetector],
    calibration: ColumnSet,
    n_inputs: int,
    target_flag_rate: float = 0.005,
    culprits: ColumnSet | None = None,
) -> list[LayerDetector]:
    """Thresholds such that, with 90% confidence, at most `target_flag_rate` of unseen clean
    inputs get any flagged column in any layer.

    A threshold just above the (k+1)-th highest of n calibration scores flags an unseen input
    with a probability distributed as Beta(k+1, n-k) (the conformal argument), so a layer may
    flag k calibration inputs where the Clopper-Pearson bound for k of n is within the target.
    Calibrating to exactly the target instead overshoots it on held-out inputs (a tiny BERT
    calibrated to 0.5% on 1,200 reviews flagged 0.75% of another 1,200). The layers share the
    count: the calibration inputs they flag together, plus one for each active layer beyond the
    first (each layer's own "+1" above), stay within it.

    With `culprits` (misbehaving inputs' columns, culprits marked positive), the count goes to the
    layers that flag the most culprits per clean input spent, and layers that flag none are
    switched off (threshold NEVER). Without them (one-class), every layer gets the same rank.
    """
    allowed = allowed_flags(n_inputs, target_flag_rate)
    budget = FlagBudget(layers, calibration, n_inputs, culprits)
    ranks = allocate(budget, len(layers), allowed) if len(budget.weight) else [-1] * len(layers)
    if all(r < 0 for r in ranks):  # one-class, or no layer flags any culprit: the same rank for all
        rank = allowed
        while rank > 0 and budget.cost([rank] * len(layers)) > allowed:
            rank -= 1
        ranks = [rank] * len(layers)
    return [
        LayerDetector(d.w1, d.b1, d.w2, d.b2, budget.threshold(i, r))
        for i, (d, r) in enumerate(zip(layers, ranks, strict=True))
    ]


def calibration_note(n: int, target_flag_rate: float, layers: int, joint: bool) -> str:
    """What a calibration set of `n` inputs lets the detector do, when it is too small for every layer and
    the joint rule to flag: each rule switched on costs one of the count (detector/calibrate.py)."""
    rules = layers + int(joint)
    needed = calibration_size_needed(target_flag_rate, rules)
    if n >= needed:
        return ""
    allowed = allowed_flags(n, target_flag_rate)
    what = f"{layers} layers" + (" and the joint rule" if joint else "")
    if allowed == 0:
        return (
            f"note: {n} calibration inputs are too few to show a {target_flag_rate:.2%} flag rate: every threshold "
            f"sits above all of them (give at least {calibration_size_needed(target_flag_rate)} with --calibration "
            f"to let one layer flag, {needed} for all {what})\n"
        )
    return (
        f"note: {n} calibration inputs allow {allowed} flagged at a {target_flag_rate:.2%} flag rate, and each layer "
        f"or rule switched on costs one more, so at most {min(allowed + 1, rules)} of the {what} can flag (give at "
        f"least {needed} with --calibration for all)\n"
    )

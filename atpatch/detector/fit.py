"""Fitting the per-layer over-attention detector from a debugging set, and calibrating it.

Supervised: the key columns of the culprit positions (given, or found by `localize`) in
misbehaving inputs are positives; every other unmasked column, of misbehaving and clean
inputs, is a negative. Each layer gets a one-hidden-layer MLP over the op's column features,
trained with a classification loss plus a contrastive one (benign columns pulled to their
centre in the hidden space, culprit columns pushed at least a margin away), so it stays in
the op's detector form. One-class: with clean inputs only, a column's score is the sum of its
features' positive z-scores against the benign distribution.

Either way, the thresholds are calibrated on held-out clean inputs so that, with 90%
confidence, the share of unseen clean inputs with any flagged column stays within the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..ops.reference import LayerDetector, attended_columns, column_features, feature_scores
from .probe import AttentionProbe

__all__ = [
    "ColumnSet",
    "FitReport",
    "allowed_flags",
    "calibrate",
    "calibration_size_needed",
    "collect_columns",
    "fit_one_class",
    "fit_supervised",
    "flag_rate_bound",
]


@dataclass
class ColumnSet:
    """Per layer: the features of every unmasked key column, which input it came from, and its label."""

    features: list[np.ndarray]  # per layer [n_columns, FEATURES_PER_HEAD * heads]
    example: np.ndarray  # [n_columns] index of the input it belongs to
    positive: np.ndarray  # [n_columns] bool: a culprit column

    def followed_by(self, other: ColumnSet, other_offset: int) -> ColumnSet:
        """Both sets in one; `other`'s input indices shifted by `other_offset` to stay distinct."""
        return ColumnSet(
            [np.concatenate(pair) for pair in zip(self.features, other.features, strict=True)],
            np.concatenate([self.example, other.example + other_offset]),
            np.concatenate([self.positive, other.positive]),
        )


@dataclass(frozen=True)
class FitReport:
    kind: str
    positives: int
    negatives: int
    thresholds: list[float]
    calibration_flag_rate: float  # share of calibration inputs with any flagged column
    positive_recall: list[float]  # per layer: share of culprit columns above threshold


def collect_columns(
    probe: AttentionProbe,
    feeds: dict[str, np.ndarray],
    culprits: Sequence[Sequence[int] | None] | None = None,
    batch_size: int = 64,
) -> ColumnSet:
    """Features of every unmasked key column of every input, batch by batch (maps are not kept)."""
    per_layer: list[list[np.ndarray]] = [[] for _ in range(probe.num_layers)]
    example, positive = [], []
    for part, out in probe.iter_batches(feeds, batch_size):
        valid = attended_columns(out.before[0])  # [B, K]: a column some real query attends to
        for layer, m in enumerate(out.before):
            per_layer[layer].append(column_features(m)[valid])
        rows, cols = np.nonzero(valid)
        example.append(rows + part.start)
        flags = np.zeros(valid.shape, dtype=bool)
        for r in range(valid.shape[0]):
            given = culprits[part.start + r] if culprits is not None else None
            for p in given or ():
                if p < valid.shape[1]:
                    flags[r, p] = True
        positive.append(flags[rows, cols])
    return ColumnSet([np.concatenate(f) for f in per_layer], np.concatenate(example), np.concatenate(positive))


def _standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    return mean, np.where(std > 1e-6, std, 1.0)


def _fold(w1: np.ndarray, b1: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights for raw features equal to `w1` applied to standardised ones."""
    return (w1 / std[:, None]).astype(np.float32), (b1 - (mean / std) @ w1).astype(np.float32)


def _train_layer(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, seed: int) -> tuple[np.ndarray, ...]:
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    lin1, lin2 = torch.nn.Linear(x.shape[1], hidden), torch.nn.Linear(hidden, 1)
    params = [*lin1.parameters(), *lin2.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    pos_weight = torch.tensor(max(1.0, float((y == 0).sum()) / max(1.0, float(y.sum()))))
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(4096):
            h = torch.relu(lin1(xt[idx]))
            logit = lin2(h).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, yt[idx], pos_weight=pos_weight)
            benign, culprit = h[yt[idx] == 0], h[yt[idx] == 1]
            if len(benign) and len(culprit):
                centre = benign.mean(dim=0, keepdim=True)
                pull = ((benign - centre) ** 2).sum(dim=1).mean()
                push = torch.relu(1.0 - (culprit - centre).norm(dim=1)).pow(2).mean()
                loss = loss + 0.1 * (pull + push)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (
            lin1.weight.T.numpy().copy(),
            lin1.bias.numpy().copy(),
            lin2.weight[0].numpy().copy(),
            lin2.bias.numpy().copy(),
        )


def fit_supervised(train: ColumnSet, hidden: int = 8, epochs: int = 30, seed: int = 0) -> list[LayerDetector]:
    """Per-layer detectors (threshold 0 until calibrated) from culprit and benign columns."""
    if not train.positive.any():
        raise ValueError("no culprit columns to learn from; give culprit spans or misbehaving inputs to localize")
    layers = []
    for layer, x in enumerate(train.features):
        mean, std = _standardise(x)
        w1, b1, w2, b2 = _train_layer((x - mean) / std, train.positive, hidden, epochs, seed + layer)
        w1, b1 = _fold(w1, b1, mean, std)
        layers.append(LayerDetector(w1, b1, w2.astype(np.float32), b2.astype(np.float32), 0.0))
    return layers


def fit_one_class(clean: ColumnSet) -> list[LayerDetector]:
    """Per-layer detectors from clean columns only: sum of positive z-scores of the features."""
    layers = []
    for x in clean.features:
        mean, std = _standardise(x)
        n = x.shape[1]
        w1, b1 = _fold(np.eye(n, dtype=np.float32), np.zeros(n, np.float32), mean, std)
        layers.append(LayerDetector(w1, b1, np.ones(n, np.float32), np.zeros(1, np.float32), 0.0))
    return layers


def _max_score_per_input(columns: ColumnSet, layer: int, detector: LayerDetector, n_inputs: int) -> np.ndarray:
    scores = feature_scores(columns.features[layer], detector)
    best = np.full(n_inputs, -np.inf, dtype=np.float32)
    np.maximum.at(best, columns.example, scores)
    return best


CONFIDENCE = 0.9  # how sure calibration is that unseen clean inputs stay within the target


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


def calibrate(
    layers: list[LayerDetector], calibration: ColumnSet, n_inputs: int, target_flag_rate: float = 0.005
) -> list[LayerDetector]:
    """Thresholds such that, with 90% confidence, at most `target_flag_rate` of unseen clean
    inputs get any flagged column.

    A threshold just above the (k+1)-th highest of n calibration scores flags an unseen input
    with a probability distributed as Beta(k+1, n-k) (the conformal argument), so a layer may
    flag k calibration inputs where the Clopper-Pearson bound for k of n is within the target.
    Calibrating to exactly the target instead overshoots it on held-out inputs (a tiny BERT
    calibrated to 0.5% on 1,200 reviews flagged 0.75% of another 1,200). The layers share the
    count: each may flag its r highest-scoring inputs, with the largest r whose union, plus one
    for each layer beyond the first (each layer's own "+1" above), stays within it; layers that
    flag the same inputs thus keep more of the budget than a fixed split would give them.
    """
    allowed = allowed_flags(n_inputs, target_flag_rate)
    scores = [_max_score_per_input(calibration, i, d, n_inputs) for i, d in enumerate(layers)]
    ranked = [np.sort(s)[::-1] for s in scores]

    def thresholds(rank: int) -> list[float]:
        # The highest score that must not be flagged, nudged up: flagging is "strictly greater".
        return [float(np.nextafter(np.float32(r[min(rank, n_inputs - 1)]), np.float32(np.inf))) for r in ranked]

    def union(limits: list[float]) -> int:
        return int(np.any([s > t for s, t in zip(scores, limits, strict=True)], axis=0).sum())

    rank = allowed
    while rank > 0 and union(thresholds(rank)) + len(layers) - 1 > allowed:
        rank -= 1
    limits = thresholds(rank)
    return [LayerDetector(d.w1, d.b1, d.w2, d.b2, t) for d, t in zip(layers, limits, strict=True)]


def report(kind: str, train: ColumnSet, layers: list[LayerDetector], calibration: ColumnSet, n_cal: int) -> FitReport:
    flagged = np.zeros(n_cal, dtype=bool)
    recall = []
    for layer, detector in enumerate(layers):
        flagged |= _max_score_per_input(calibration, layer, detector, n_cal) > detector.threshold
        pos = train.features[layer][train.positive]
        recall.append(float((feature_scores(pos, detector) > detector.threshold).mean()) if len(pos) else float("nan"))
    return FitReport(
        kind,
        int(train.positive.sum()),
        int((~train.positive).sum()),
        [lay.threshold for lay in layers],
        float(flagged.mean()),
        recall,
    )

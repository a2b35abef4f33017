"""Group fairness figures of a model's predictions: demographic-parity and equalized-odds gaps.

Shared by `atpatch eval` (evaluate.py) and the fairness fit (detector/tradeoff.py), so both count
the same thing. Groups are 0/1; the favourable outcome is label id `POSITIVE`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["POSITIVE", "above", "group_gaps", "rate_gap"]

POSITIVE = 1  # the favourable label for the demographic-parity and equalized-odds gaps


def rate_gap(positive: np.ndarray, among: np.ndarray, group: np.ndarray) -> float | None:
    """|rate(group 1) - rate(group 0)| of `positive` among the rows `among`; None where a group has no such row."""
    rates = [positive[among & (group == g)] for g in (0, 1)]
    if not all(len(r) for r in rates):
        return None
    return float(abs(rates[1].mean() - rates[0].mean()))


def group_gaps(pred: np.ndarray, labels: np.ndarray, group: np.ndarray) -> dict[str, float | None]:
    """Demographic-parity and equalized-odds gaps of predictions `pred` between the 0/1 groups."""
    positive, actual = pred == POSITIVE, labels == POSITIVE
    everyone = np.ones(len(pred), bool)
    tpr, fpr = rate_gap(positive, actual, group), rate_gap(positive, ~actual, group)
    return {
        "parity_gap": rate_gap(positive, everyone, group),
        "tpr_gap": tpr,
        "fpr_gap": fpr,
        # Equalized odds asks for both rates equal: with one of them undefined, so is the gap.
        "equalized_odds_gap": None if tpr is None or fpr is None else max(tpr, fpr),
    }


def above(value: float | None, floor: float | None) -> float | None:
    return None if value is None or floor is None else value - floor

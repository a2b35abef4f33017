"""Detector fitting and calibration on synthetic column features, and ddmin on a known culprit set."""

from __future__ import annotations

import numpy as np
import pytest

from atpatch.detector.fit import ColumnSet, calibrate, fit_one_class, fit_supervised, report
from atpatch.detector.localize import _ddmin
from atpatch.ops import spec


def _columns(rng: np.random.Generator, n_inputs: int, per_input: int, culprit_shift: float | None) -> ColumnSet:
    """Benign columns ~ N(1, 0.3) per feature; one culprit column per input shifted when asked."""
    x = rng.normal(1.0, 0.3, size=(n_inputs * per_input, spec.num_features(2))).astype(np.float32)
    example = np.repeat(np.arange(n_inputs), per_input)
    positive = np.zeros(len(x), dtype=bool)
    if culprit_shift is not None:
        positive[::per_input] = True
        x[positive] += culprit_shift
    return ColumnSet([x, x.copy()], example, positive)


@pytest.mark.parametrize("target", [0.005, 0.05])
def test_calibration_keeps_the_clean_flag_rate_within_target(target: float, rng: np.random.Generator) -> None:
    clean = _columns(rng, 2000, 12, None)
    layers = calibrate(fit_one_class(clean), clean, 2000, target_flag_rate=target)
    result = report("one-class", clean, layers, clean, 2000)
    assert result.calibration_flag_rate <= target
    assert result.calibration_flag_rate >= target / 4  # not trivially flagging nothing


def test_supervised_detector_separates_culprits_it_was_shown(rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    train = _columns(rng, 300, 10, culprit_shift=3.0)
    held_out = _columns(rng, 1000, 10, None)
    layers = calibrate(fit_supervised(train, epochs=20), held_out, 1000, target_flag_rate=0.005)
    result = report("supervised", train, layers, held_out, 1000)
    assert result.calibration_flag_rate <= 0.005
    assert min(result.positive_recall) > 0.9


def test_ddmin_shrinks_a_restoring_set_to_the_true_culprits() -> None:
    culprits = {3, 11}
    calls: list[tuple[int, ...]] = []

    def restores(removed: object) -> bool:
        calls.append(tuple(removed))  # type: ignore[arg-type]
        return culprits <= set(removed)  # type: ignore[arg-type]

    assert sorted(_ddmin(list(range(16)), restores)) == [3, 11]
    assert len(calls) <= 64  # within localize()'s default budget

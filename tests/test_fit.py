"""Detector fitting and calibration on synthetic column features, and ddmin on a known culprit set."""

from __future__ import annotations

import numpy as np
import pytest

from atpatch.detector.calibrate import (
    NEVER,
    FlagBudget,
    allocate,
    allowed_flags,
    calibrate,
    calibration_size_needed,
    flag_rate_bound,
    flag_rate_interval,
)
from atpatch.detector.columns import ColumnSet
from atpatch.detector.fit import fit_one_class, fit_supervised, report
from atpatch.detector.joint_fit import joint_candidates
from atpatch.detector.localize import _ddmin
from atpatch.ops import spec
from atpatch.ops.reference import LayerDetector


def _columns(rng: np.random.Generator, n_inputs: int, per_input: int, culprit_shift: float | None) -> ColumnSet:
    """Benign columns ~ N(1, 0.3) per feature; one culprit column per input shifted when asked."""
    x = rng.normal(1.0, 0.3, size=(n_inputs * per_input, spec.num_features(2))).astype(np.float32)
    example = np.repeat(np.arange(n_inputs), per_input)
    positive = np.zeros(len(x), dtype=bool)
    if culprit_shift is not None:
        positive[::per_input] = True
        x[positive] += culprit_shift
    return ColumnSet([x, x.copy()], example, positive, np.tile(np.arange(per_input), n_inputs))


@pytest.mark.parametrize("target", [0.005, 0.05])
def test_calibration_keeps_the_clean_flag_rate_within_target(target: float, rng: np.random.Generator) -> None:
    clean = _columns(rng, 2000, 12, None)
    layers = calibrate(fit_one_class(clean), clean, 2000, target_flag_rate=target)
    result = report("one-class", clean, layers, clean, 2000)
    assert result.calibration_flag_rate <= target
    assert result.calibration_flag_rate >= target / 4  # not trivially flagging nothing


@pytest.mark.parametrize("n", [100, 1200, 20000])
def test_flag_rate_bound_is_clopper_pearson(n: int) -> None:
    # No input flagged: P(none of n flagged | p) = (1 - p)^n = 1 - confidence, in closed form.
    assert flag_rate_bound(0, n) == pytest.approx(1 - 0.1 ** (1 / n), rel=1e-9)
    assert flag_rate_bound(n, n) == 1.0
    bounds = [flag_rate_bound(k, n) for k in range(6)]
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    stats = pytest.importorskip("scipy.stats")
    for k in (1, 3, 5):
        assert flag_rate_bound(k, n) == pytest.approx(stats.beta.ppf(0.9, k + 1, n - k), rel=1e-9)


def test_allowed_flags_and_the_size_a_target_needs() -> None:
    assert allowed_flags(1200, 0.005) == 2  # 3 of 1200 bounds the rate at 0.56%
    assert allowed_flags(100, 0.005) == 0
    for layers in (1, 2, 6, 12):
        n = calibration_size_needed(0.005, layers)
        assert flag_rate_bound(layers - 1, n) <= 0.005 < flag_rate_bound(layers - 1, n - 1)


def test_calibrated_thresholds_hold_on_unseen_clean_inputs(rng: np.random.Generator) -> None:
    """Calibrated on 1,200 clean inputs, the flag rate on 20,000 unseen ones exceeds the target in
    about 10% of calibration sets or fewer (splitting the target evenly over the layers, as atpatch
    did before: 24 of 30)."""
    target, n = 0.005, 1200

    def clean(n_inputs: int) -> ColumnSet:  # layers that flag different inputs, as real ones do
        columns = _columns(rng, n_inputs, 12, None)
        columns.features[1] = rng.permutation(columns.features[1])
        return columns

    layers = fit_one_class(clean(2000))
    unseen = clean(20000)
    over = 0
    for _ in range(30):
        calibrated = calibrate(layers, clean(n), n, target)
        over += report("one-class", unseen, calibrated, unseen, 20000).calibration_flag_rate > target
    assert over <= 8  # expected ~3 of 30; P(more than 8 | p = 0.1) < 0.01


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


def test_the_flag_budget_goes_to_the_layers_that_separate_culprits(rng: np.random.Generator) -> None:
    """Layer 0 scores culprits like benign columns, layer 1 separates them (but not by far): the
    budget allocation switches layer 0 off and gives layer 1 the whole count, flagging more
    culprits than an equal share does, at the same clean flag rate bound."""
    pytest.importorskip("torch")
    n = 2400
    train = _columns(rng, 300, 10, culprit_shift=None)
    train.positive[::10] = True
    train.features[1][train.positive] += 0.45  # separates in layer 1 only, with overlap
    calibration = _columns(rng, n, 10, None)
    layers = fit_supervised(train, epochs=10)
    allocated = calibrate(layers, calibration, n, 0.005, culprits=train)
    shared = calibrate(layers, calibration, n, 0.005)
    assert allocated[0].threshold == NEVER and allocated[1].threshold < NEVER
    by_allocation = report("supervised", train, allocated, calibration, n)
    by_share = report("supervised", train, shared, calibration, n)
    assert by_allocation.positive_recall[1] > by_share.positive_recall[1]
    # The same bound holds: at most `allowed` calibration inputs flagged, plus one per extra active layer.
    assert by_allocation.calibration_flag_rate * n <= allowed_flags(n, 0.005)


def test_thresholds_sit_midway_between_calibration_scores(rng: np.random.Generator) -> None:
    """A threshold 1 ulp above the highest unflagged calibration score let the op's own float32
    rounding flag that input too (6 of 2000 where fit counted 5, on a MiniLM): each threshold
    lies halfway between the scores it separates, so rounding far larger than 1e-6 flips none."""
    n = 500
    calibration = _columns(rng, n, 8, None)
    layer = _linear_layer(calibration.features[0].shape[1])
    budget = FlagBudget([layer], calibration, n, None)
    for rank in (0, 1, 4, 37):
        threshold = budget.threshold(0, rank)
        scores = budget.scores[0]
        above, below = scores[scores > threshold], scores[scores <= threshold]
        assert len(above) == rank
        gap = (below.max() - above.min()) if rank else (below.max() - np.sort(scores)[-2])
        assert abs(threshold - below.max()) >= abs(gap) / 2 * (1 - 1e-5)
        if rank:
            assert above.min() - threshold >= (above.min() - below.max()) / 2 * (1 - 1e-5)


def test_thresholds_stay_clear_of_tied_calibration_scores(rng: np.random.Generator) -> None:
    """Tabular rows repeat, so calibration scores tie (here: a handful of values, each many times, some
    within float32 rounding of each other). A threshold on a tie (1 ulp above it) let the kernel and the
    ONNX function disagree on 8 of 1,000 COMPAS rows: every threshold keeps clear of every calibration
    score by more than rounding, and flags no more inputs than its rank asks (fewer where it splits a tie)."""
    n = 400
    calibration = _columns(rng, n, 8, None)
    values = np.float32([2.5, 2.0, 2.0 * (1 + 2e-6), 1.5, 1.2])  # the third is the second, rounded differently
    for x in calibration.features:
        x[:, 0] = rng.choice(values[1:], size=len(x))  # scores repeat: 2.0, ~2.0, 1.5, 1.2 ...
        x[:: 8 * 40, 0] = values[0]  # ... and 10 inputs score 2.5
    layer = _linear_layer(calibration.features[0].shape[1])
    budget = FlagBudget([layer], calibration, n, None)
    scores = budget.scores[0]
    for rank in (0, 5, 10, 11, 60, n - 1):
        threshold = budget.threshold(0, rank)
        assert np.abs(scores - threshold).min() > 1e-5 * abs(threshold), (rank, threshold)
        assert (scores > threshold).sum() <= max(rank, 0)
    assert (scores > budget.threshold(0, 10)).sum() == 10  # the 2.5s, clear of the tie below them
    assert (scores > budget.threshold(0, 11)).sum() == 10  # the tie at ~2.0 is left unflagged


def test_between_layers_that_flag_the_same_culprits_the_widest_margin_wins(rng: np.random.Generator) -> None:
    """Both layers score every culprit above every clean calibration input (a tie in culprits per
    clean input spent); the second clears them by far more, as a layer that unseen triggers still
    clear does: the budget goes to it, not to whichever layer comes first."""
    n = 600
    calibration = _columns(rng, n, 8, None)
    train = _columns(rng, 50, 8, None)
    train.positive[::8] = True
    for layer, score in ((0, 4.0), (1, 9.0)):  # clean scores ~ N(1, 0.3): both clear them all
        train.features[layer][train.positive, 0] = score + rng.normal(0, 0.05, int(train.positive.sum()))
    layer = _linear_layer(calibration.features[0].shape[1])
    budget = FlagBudget([layer, layer], calibration, n, train)
    assert budget.gain([0, -1]) == budget.gain([-1, 0]) == budget.gain([0, 0])  # the tie
    ranks = allocate(budget, 2, allowed_flags(n, 0.05))
    assert ranks[0] < 0 <= ranks[1]


def _linear_layer(features: int) -> LayerDetector:
    """score = feature 0 (kept linear: the hidden unit's bias keeps it above 0)."""
    w1 = np.zeros((features, 1), np.float32)
    w1[0, 0] = 1.0
    return LayerDetector(w1, np.full(1, 10.0, np.float32), np.ones(1, np.float32), np.full(1, -10.0, np.float32), 0.0)


def test_the_joint_rule_takes_the_budget_when_no_single_layer_separates_culprits(rng: np.random.Generator) -> None:
    """Culprit columns a little above benign ones in each of four layers: no layer's threshold at a 0.5%
    budget catches many, their sum does. The joint candidate flags more culprits, within the same
    count of calibration inputs flagged as calibrate() allows."""
    n, per_input, layers = 2400, 10, 4
    detectors = [_linear_layer(spec.num_features(2))] * layers

    def columns(n_inputs: int, shift: float | None) -> ColumnSet:
        one = _columns(rng, n_inputs, per_input, None)
        features = [rng.normal(0.0, 1.0, size=one.features[0].shape).astype(np.float32) for _ in range(layers)]
        positive = np.zeros(len(one.example), bool)
        if shift is not None:
            positive[3::per_input] = True
            for f in features:
                f[positive, 0] += shift
        return ColumnSet(features, one.example, positive, one.position)

    calibration, benign, bad = columns(n, None), columns(2000, None), columns(300, 1.6)
    options = joint_candidates(detectors, calibration, n, 0.005, bad, benign, grid=False)
    assert options[0].joint is None
    joint = max(options[1:], key=lambda c: c.gain)
    assert joint.joint is not None and joint.gain > 1.5 * options[0].gain, [c.gain for c in options]
    assert all(w == pytest.approx(1.0, rel=0.1) for w in joint.joint.weights)  # each layer's clean spread is 1
    result = report("supervised", bad, joint.layers, calibration, n, joint.joint, grid=False)
    active = sum(d.threshold < NEVER for d in joint.layers) + 1
    assert result.calibration_flag_rate * n <= allowed_flags(n, 0.005) + active - 1
    assert result.joint_recall is not None and result.joint_recall > max(
        report("supervised", bad, options[0].layers, calibration, n).positive_recall
    )


def test_fit_says_how_many_rules_a_small_calibration_set_lets_flag() -> None:
    from atpatch.detector.calibrate import allowed_flags, calibration_note, calibration_size_needed

    assert calibration_note(calibration_size_needed(0.005, 7), 0.005, 6, joint=True) == ""
    # Below what one layer needs, nothing can flag.
    none = calibration_note(100, 0.005, 6, joint=False)
    assert allowed_flags(100, 0.005) == 0
    assert "every threshold sits above all of them" in none
    assert f"{calibration_size_needed(0.005)} with --calibration to let one layer flag" in none
    assert f"{calibration_size_needed(0.005, 6)} for all 6 layers" in none
    # Between: each rule switched on costs one of the count, so the count caps how many rules flag.
    allowed = allowed_flags(1000, 0.005)
    assert 0 < allowed < 6
    some = calibration_note(1000, 0.005, 6, joint=True)
    assert f"allow {allowed} flagged" in some and f"at most {allowed + 1} of the 6 layers and the joint rule" in some
    assert f"at least {calibration_size_needed(0.005, 7)} with --calibration" in some


@pytest.mark.parametrize(("flagged", "n"), [(0, 900), (7, 900), (9, 1200), (1, 1), (40, 40)])
def test_flag_rate_interval_is_clopper_pearsons(flagged: int, n: int) -> None:
    """Against scipy's beta quantiles (an independent implementation of the same interval)."""
    beta = pytest.importorskip("scipy.stats").beta
    low, high = flag_rate_interval(flagged, n)
    assert low == pytest.approx(0.0 if flagged == 0 else beta.ppf(0.025, flagged, n - flagged + 1), abs=1e-9)
    assert high == pytest.approx(1.0 if flagged == n else beta.ppf(0.975, flagged + 1, n - flagged), abs=1e-9)

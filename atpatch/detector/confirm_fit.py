"""Fitting the effect check (ops/joint.py, Confirm; rewrite/confirm.py): its class, its score, its threshold.

The class is the one the misbehaving inputs went to; the check applies only when nearly all of them went
to one (a backdoor's target), and only to a classifier. Its score is the joint rule's weighted sum of the
layers' column scores, over 2 x 2 blocks on an image's patch grid (a trigger straddles patches). Its
threshold is the lowest at which the clean calibration inputs whose class the check changes, added to
those the detector flags, stay within the count the clean-flag target allows (calibrate.allowed_flags),
and at most CANDIDATE_SHARE of them are tried (each tried input runs the second pass). A change counts
only where the class's logit falls by the check's drop: removing a trigger takes it down far, while a
clean image near a class boundary crosses it with a small fall, so a drop that leaves out clean changes
buys a lower threshold. Pass 2 patches the best window, or the two best where the detector's best
misses part of a trigger. The drop and the windows are those whose threshold changes most misbehaving
debugging inputs.
`atpatch fit` keeps the check only where it fixes more misbehaving inputs held out of the fit (fixes.py
says why).

Measured first (benchmarks/vision_backdoor.py, seed 0, with the published localized detectors and the
check's threshold swept on the calibration images): a 3 x 3 checkerboard straddling four patches,
ASR 5.90% -> 1.54% with 0.55% of clean test images flagged (0.50% before); a 5 x 5 square, 4.36% ->
0.59% (0.35% -> 0.45%); a random-position patch, 19.33% -> 12.21% (0.65% -> 0.75%). Trying every
unflagged input instead of those sent to the misbehaving class flagged ten times as many clean images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx

from ..data import Dataset
from ..fixes import SpreadChoice
from ..ops.joint import BLOCKS, Confirm
from ..ops.weights import Detector
from ..progress import Progress
from ..rewrite import patch_model
from ..rewrite.confirm import CANDIDATES, CONFIRM_DROP, CONFIRM_SCORE, FLAGGED_ROWS, classifier_output
from ..rewrite.crosslayer import ROWS
from ..rewrite.unpatch import inline_second_pass

__all__ = ["CANDIDATE_SHARE", "DOMINANT", "RESERVE", "check_label", "effect_check", "fit_confirm"]

DOMINANT = 0.9  # share of the misbehaving inputs that must go to one class for the check to apply
RESERVE = 0.2  # share of the clean-flag target the detector leaves to the check where it applies
CANDIDATE_SHARE = 0.02  # most calibration inputs the check may try: each costs a second pass
_LOWEST = float(np.finfo(np.float32).min)


def check_label(model: onnx.ModelProto, predicted: np.ndarray) -> int | None:
    """The class the check watches: the one (nearly) all misbehaving inputs went to (`predicted`, the
    original's classes for them); None when they spread over classes or the model is no classifier."""
    batch = {
        d.dim_param
        for v in model.graph.input
        if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim) > 0
        for d in v.type.tensor_type.shape.dim[:1]
        if d.HasField("dim_param")
    }
    if not len(predicted) or classifier_output(list(model.graph.output), batch) is None:
        return None
    counts = np.bincount(predicted)
    label = int(counts.argmax())
    return label if counts[label] >= DOMINANT * len(predicted) else None


def _tried(model: onnx.ModelProto, detector: Detector, data: Dataset, what: str) -> tuple[np.ndarray, ...]:
    """Per input of `data`: its check score, whether the check tries it (at no threshold), whether its
    class then changes, whether the detector flags it, and how far the checked label's logit falls."""
    from ..runtime import create_session

    probe = inline_second_pass(patch_model(model, detector)[0])
    names = [CONFIRM_SCORE, CANDIDATES, ROWS, FLAGGED_ROWS, CONFIRM_DROP]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = create_session(probe)
    inputs = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in data.feeds.items() if k in inputs}
    parts = []
    total = len(data)
    with Progress(total, f"fit: the effect check on the {what}", unit="input") as bar:
        for start in range(0, total, 64):
            stop = min(start + 64, total)
            parts.append(session.run(names, {k: v[start:stop] for k, v in feeds.items()}))
            bar.step(n=stop - start)
    score, tried, rows, flagged, drop = (np.concatenate([p[i] for p in parts]) for i in range(5))
    return score, tried, tried & rows, flagged, drop


def _lowest_threshold(score: np.ndarray, tried: np.ndarray, kept: np.ndarray, budget: int, cap: int) -> float | None:
    """The lowest threshold at which at most `budget` inputs are `kept` and at most `cap` tried."""
    best = None
    for t in np.unique(score[tried])[::-1]:  # from the highest: counts only grow as the threshold falls
        if (kept & (score >= t)).sum() > budget or (tried & (score >= t)).sum() > cap:
            break
        best = float(t)
    return best


def fit_confirm(
    model: onnx.ModelProto,
    detector: Detector,
    calibration: Dataset,
    label: int,
    allowed: int,
    grid: bool,
    bad: Dataset | None = None,
) -> Confirm | None:
    """The check for `detector` (its joint rule's weights; window 2 x 2 on a grid). Each number of windows
    patched together (ops/joint.py BLOCKS) and each drop (0, or just above a clean calibration input's
    fall) gets the lowest threshold at which the calibration inputs it flags or changes stay within
    `allowed`; of those, the one that changes most of the misbehaving inputs `bad` (on a tie, the fewer
    windows and the lower drop; one window and no drop without them). None when no threshold fits."""
    if detector.joint is None:
        return None
    window = 2 if grid else detector.joint.window
    cap = int(CANDIDATE_SHARE * len(calibration))
    weigh = bad is not None and len(bad) > 0
    best, most = None, -1
    for blocks in BLOCKS if weigh else BLOCKS[:1]:
        probe = replace(detector, confirm=Confirm(label, _LOWEST, detector.joint.weights, window, blocks=blocks))
        score, tried, changed, flagged, drop = _tried(model, probe, calibration, "calibration")
        budget = allowed - int(flagged.sum())
        drops = [0.0]
        if weigh:
            falls = np.unique(drop[changed & (drop >= 0)]).astype(np.float32)
            drops += [float(np.nextafter(f, np.float32(np.inf))) for f in falls]
            b_score, _, b_changed, _, b_drop = _tried(model, probe, bad, "misbehaving inputs")
        for d in drops:
            t = _lowest_threshold(score, tried, changed & (drop >= d), budget, cap)
            if t is None:
                continue
            caught = int((b_changed & (b_drop >= d) & (b_score >= t)).sum()) if weigh else 0
            if caught > most:
                best, most = replace(probe.confirm, threshold=t, drop=d), caught
    return best


def effect_check(
    model: onnx.ModelProto,
    choice: SpreadChoice,
    reduced: Callable[[], Detector],
    refit_reduced: Callable[[np.ndarray], Detector | None],
    calibration: Dataset,
    bad: Dataset,
    wrong: np.ndarray,
    allowed: int,
    grid: bool,
) -> SpreadChoice | None:
    """`choice` (the detector fixes.choose_spread chose) with the check, its layers calibrated at the target
    less RESERVE (`reduced()`; `refit_reduced(keep)` on the misbehaving inputs `keep` only), where that
    fixes more of the misbehaving inputs the original gets wrong (`wrong` marks them in `bad`): counted
    on inputs held out of the fit, as the spread is, where choose_spread could hold some out. None when
    the check does not apply or fixes no more. Patch grids only: on text every published localized
    detector already reaches the oracle's ASR, where the reserve would only cost its layers flags."""
    from ..fixes import fixed, folds, predict_classes

    fixable = bad.subset(np.flatnonzero(wrong))
    if not grid or not len(fixable):
        return None
    label = check_label(model, predict_classes(model, fixable))
    if label is None:
        return None
    spread = choice.detector.spread

    def with_check(detector: Detector, fitted: np.ndarray) -> Detector:
        fitted_bad = bad.subset(fitted[wrong[fitted]])
        confirm = fit_confirm(model, replace(detector, spread=spread), calibration, label, allowed, grid, fitted_bad)
        return replace(detector, spread=spread, confirm=confirm)

    held_out = None
    if choice.held_out is not None:  # fitted on, the detector flags what it was shown: the check looks useless
        held_out = 0
        for held in folds(len(bad)):
            keep = np.setdiff1d(np.arange(len(bad)), held)
            detector = refit_reduced(keep)
            if detector is None:
                return None
            held_out += fixed(model, with_check(detector, keep), bad.subset(held[wrong[held]]))
    checked = with_check(reduced(), np.arange(len(bad)))
    if checked.confirm is None:
        return None
    got = fixed(model, checked, fixable)
    before, after = (choice.fixed, got) if held_out is None else (choice.held_out[0], held_out)
    if after <= before:
        return None
    unseen = " held out of the fit" if held_out is not None else ""
    drop = checked.confirm.drop
    fall = f" and the logit of class {label} falls by at least {drop:.3g}" if drop > 0 else ""
    which = "best-scoring 2 x 2 patches" if checked.confirm.blocks == 1 else "two best-scoring 2 x 2 blocks of patches"
    note = (
        f"effect check: an input nothing flags that the model sends to class {label} (where the misbehaving "
        f"inputs went) has its {which} patched, and keeps that only where its class changes{fall}; "
        f"fixes {after - before} more misbehaving inputs{unseen}, the layers keeping {1 - RESERVE:.0%} of the "
        "clean-flag budget\n"
    )
    return replace(
        choice,
        detector=checked,
        fixed=got,
        held_out=None if held_out is None else (held_out, choice.held_out[1]),
        note=choice.note + note,
    )

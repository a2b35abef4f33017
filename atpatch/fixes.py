"""How many misbehaving inputs a detector's patched model fixes, and the spread that fixes the most.

A trigger spanning several positions (a phrase, an image patch straddling two or four patches) may be
flagged at one of them only; the spread patches a flagged position's neighbours too. Counted on the
misbehaving inputs the detector was fitted on, the spread is chosen on the wrong evidence: there, the
detector flags exactly the positions it was shown, and a localized culprit is by construction the one
position whose removal restores the label, so patching it alone fixes the input. On inputs the fit did
not see, the detector flags whichever of the trigger's positions scores highest. Measured on the
random-position ViT (benchmarks/vision_backdoor.py --trigger random, seed 0): spread 0 fixed the most
debugging inputs, and left 29.2% ASR on the test victims where spread 1 leaves 19.3%, with the same
clean inputs flagged. So the spread is chosen by cross-fitting: the detector is fitted again without
each fold of the misbehaving inputs and its spreads are counted on that fold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .data import Dataset
from .detector import Detector
from .progress import Progress

__all__ = ["SPREADS", "SpreadChoice", "choose_spread", "fixed", "folds", "predict_classes", "wrong_answers"]

SPREADS = (0, 1, 2, 3)  # radii tried: positions along a sequence, patches on an image's grid
FOLDS = 2
MIN_PER_FOLD = 10  # fewer misbehaving inputs than FOLDS x this: the spread is counted on the fitted ones


def wrong_answers(model: onnx.ModelProto, data: Dataset) -> np.ndarray:
    """[len(data)] bool: the inputs the original `model` gets wrong, the only ones a patch can fix. Run
    once per fit: every count of fixes then runs the patched model only, on these inputs only."""
    return predict_classes(model, data) != data.labels


def fixed(model: onnx.ModelProto, detector: Detector, wrong: Dataset) -> int:
    """How many of `wrong` (inputs the original model gets wrong) the model patched with `detector` gets right."""
    from .rewrite import patch_model

    if not len(wrong):
        return 0
    return int((predict_classes(patch_model(model, detector)[0], wrong) == wrong.labels).sum())


def predict_classes(model: onnx.ModelProto, data: Dataset) -> np.ndarray:
    """The class `model` gives each input of `data`."""
    from .evaluate import run_original
    from .runtime import create_session

    return run_original(create_session(model), data, "misbehaving").logits.argmax(axis=1)


@dataclass(frozen=True)
class SpreadChoice:
    detector: Detector  # with the chosen spread
    fixed: int  # misbehaving inputs its patched model fixes (those it was fitted on)
    wrong: int  # misbehaving inputs the original model gets wrong
    held_out: tuple[int, int] | None  # (fixed, wrong) on inputs held out of the fit, at that spread; None: too few
    note: str  # what the user is told about the choice (empty: nothing to say)


def _counts(model: onnx.ModelProto, detector: Detector, wrong: Dataset, bar: Progress) -> list[int]:
    """Fixes of `wrong` at each of SPREADS (stopping once every input is fixed)."""
    counts: list[int] = []
    for radius in SPREADS:
        done = counts and counts[-1] == len(wrong)
        counts.append(len(wrong) if done else fixed(model, replace(detector, spread=radius), wrong))
        bar.step(f"spread {radius}")
    return counts


def folds(n: int) -> list[np.ndarray]:
    """The indices of each fold of `n` misbehaving inputs, the same in every count held out of the fit."""
    order = np.random.default_rng(0).permutation(n)
    return [np.sort(order[fold::FOLDS]) for fold in range(FOLDS)]


def _held_out_counts(
    model: onnx.ModelProto,
    bad: Dataset,
    wrong: np.ndarray,
    refit: Callable[[np.ndarray], Detector | None],
    bar: Progress,
) -> np.ndarray | None:
    """Fixes at each of SPREADS summed over the folds, each counted by the detector refitted without it;
    None when some fold leaves no culprit to refit on (refit gives None)."""
    totals = np.zeros(len(SPREADS), np.int64)
    for fold, held in enumerate(folds(len(bad))):
        detector = refit(np.setdiff1d(np.arange(len(bad)), held))
        bar.step(f"refit without fold {fold + 1}")
        if detector is None:
            return None
        totals += _counts(model, detector, bad.subset(held[wrong[held]]), bar)
    return totals


def choose_spread(
    model: onnx.ModelProto,
    detector: Detector,
    bad: Dataset,
    wrong: np.ndarray,
    refit: Callable[[np.ndarray], Detector | None],
) -> SpreadChoice:
    """The spread (smallest on ties) fixing the most misbehaving inputs held out of the fit: `wrong` marks
    the inputs of `bad` the original model gets wrong (wrong_answers), `refit(keep)` fits the detector as
    `detector` was, on the misbehaving inputs `keep` (indices into `bad`) only, or gives None when they hold
    no culprit. With too few misbehaving inputs to hold any out, the spread is counted on all of them."""
    every = bad.subset(np.flatnonzero(wrong))
    folds = len(bad) >= FOLDS * MIN_PER_FOLD
    steps = FOLDS * (1 + len(SPREADS)) + 1 if folds else len(SPREADS)  # refits, spreads, the final count
    with Progress(steps, "fit: choosing the spread", unit="step") as bar:
        totals = _held_out_counts(model, bad, wrong, refit, bar) if folds else None
        held_out = totals is not None
        if totals is None:
            totals = np.asarray(_counts(model, detector, every, bar))
        best = int(np.argmax(totals))
        chosen = replace(detector, spread=SPREADS[best])
        got = fixed(model, chosen, every) if held_out else int(totals[best])
    note = ""
    if best:
        where = "patches" if bad.tokens is None else "tokens"
        unseen = " held out of the fit" if held_out else ""
        note = (
            f"spread: the {where} within {SPREADS[best]} of a flagged one are patched too, which fixes "
            f"{int(totals[best] - totals[0])} more misbehaving inputs{unseen}\n"
        )
    return SpreadChoice(chosen, got, len(every), (int(totals[best]), len(every)) if held_out else None, note)

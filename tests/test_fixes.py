"""Choosing the spread on misbehaving inputs held out of the fit (fixes.choose_spread).

The patched models are stood in for by a table of fixes: which detector (fitted on every misbehaving
input, or refitted without a fold), which spread, which inputs. What is checked is the choice, and that
every input is held out exactly once; the end-to-end effect is measured in benchmarks/vision_backdoor.py
(the random-position ViT: 29.2% ASR with the spread counted on the fitted inputs, 19.3% held out).
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from atpatch import fixes
from atpatch.data import Dataset
from atpatch.detector import Detector
from atpatch.ops.reference import LayerDetector


def _detector(kind: str) -> Detector:
    layer = LayerDetector(np.ones((6, 2), np.float32), np.zeros(2, np.float32), np.ones(2, np.float32),
                          np.zeros(1, np.float32), 0.0)  # fmt: skip
    return Detector((layer,), kind)


def _images(n: int, rng: np.random.Generator) -> Dataset:
    ids = np.arange(n, dtype=np.float32)  # each input's pixels carry its index, to tell the inputs apart
    pixels = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)
    pixels[:, 0, 0, 0] = ids
    return Dataset({"pixel_values": pixels}, np.zeros(n, np.int64), [None] * n, None, ("a", "b"))


def _table(monkeypatch: pytest.MonkeyPatch, refits: list[np.ndarray]) -> None:
    """Fitted on every input (kind "all"), spread 0 fixes each of them and spread 1 only half (the fit
    flags the very positions it was shown); refitted without a fold, spread 0 fixes a quarter of the fold
    and spread 1 all of it (unseen, the detector flags one of a trigger's positions)."""

    def fake(model: object, detector: Detector, data: Dataset) -> int:
        n = len(data)
        if detector.kind == "all":
            return n if detector.spread == 0 else n // 2
        held = data.feeds["pixel_values"][:, 0, 0, 0].astype(int)
        assert not np.isin(held, refits[-1]).any(), "counted on inputs the refit was fitted on"
        return n // 4 if detector.spread == 0 else n

    monkeypatch.setattr(fixes, "fixed", fake)


def test_the_spread_is_chosen_on_inputs_held_out_of_the_fit(monkeypatch: pytest.MonkeyPatch,
                                                             rng: np.random.Generator) -> None:  # fmt: skip
    bad, refits = _images(40, rng), []

    def refit(keep: np.ndarray) -> Detector:
        refits.append(keep)
        return _detector("fold")

    _table(monkeypatch, refits)
    choice = fixes.choose_spread(None, _detector("all"), bad, np.ones(40, bool), refit)
    assert choice.detector.spread == 1 and choice.detector.kind == "all"
    assert (choice.fixed, choice.wrong) == (20, 40)  # the fitted inputs, at the chosen spread
    assert choice.held_out == (40, 40)
    assert "within 1 of a flagged one" in choice.note and "30 more misbehaving inputs held out" in choice.note
    # Two folds: each input is held out once, and each refit sees the rest.
    assert len(refits) == fixes.FOLDS
    held = [np.setdiff1d(np.arange(40), keep) for keep in refits]
    assert sorted(np.concatenate(held).tolist()) == list(range(40))


def test_too_few_misbehaving_inputs_are_all_counted_as_fitted(monkeypatch: pytest.MonkeyPatch,
                                                              rng: np.random.Generator) -> None:  # fmt: skip
    refits: list[np.ndarray] = [np.array([], int)]
    _table(monkeypatch, refits)
    few = fixes.FOLDS * fixes.MIN_PER_FOLD - 1
    choice = fixes.choose_spread(
        None, _detector("all"), _images(few, rng), np.ones(few, bool), lambda keep: pytest.fail("refitted")
    )
    assert choice.detector.spread == 0 and choice.held_out is None and choice.note == ""
    assert (choice.fixed, choice.wrong) == (few, few) and choice.detector.kind == "all"


def test_a_fold_without_culprits_falls_back_to_the_fitted_inputs(monkeypatch: pytest.MonkeyPatch,
                                                                 rng: np.random.Generator) -> None:  # fmt: skip
    """Localization may find culprits in a few misbehaving inputs only; a fold holding all of them leaves
    the other nothing to refit on (refit gives None): no traceback, the spread counted on every input."""
    refits: list[np.ndarray] = [np.array([], int)]
    _table(monkeypatch, refits)
    choice = fixes.choose_spread(None, _detector("all"), _images(40, rng), np.ones(40, bool), lambda keep: None)
    assert choice.detector.spread == 0 and choice.held_out is None and (choice.fixed, choice.wrong) == (40, 40)


def test_only_inputs_the_original_gets_wrong_are_counted(monkeypatch: pytest.MonkeyPatch,
                                                         rng: np.random.Generator) -> None:  # fmt: skip
    """An input the original model already gets right cannot be fixed: neither the folds nor the final
    count run the patched model on it, and it is not in the misbehaving count."""
    bad, right = _images(40, rng), np.array([3, 8, 21, 30])
    wrong = ~np.isin(np.arange(40), right)
    seen: list[np.ndarray] = []

    def fake(model: object, detector: Detector, data: Dataset) -> int:
        seen.append(data.feeds["pixel_values"][:, 0, 0, 0].astype(int))
        return len(data) if detector.spread == 1 else 0

    monkeypatch.setattr(fixes, "fixed", fake)
    choice = fixes.choose_spread(None, _detector("all"), bad, wrong, lambda keep: _detector("fold"))
    assert not np.isin(np.concatenate(seen), right).any()
    assert choice.detector.spread == 1 and choice.wrong == 36 and choice.held_out == (36, 36)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_choice_shows_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    """Two refits and up to nine patched models run here: a user at a terminal sees the steps go by."""
    refits: list[np.ndarray] = []
    _table(monkeypatch, refits)
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)

    def refit(keep: np.ndarray) -> Detector:
        refits.append(keep)
        return _detector("fold")

    choice = fixes.choose_spread(None, _detector("all"), _images(40, rng), np.ones(40, bool), refit)
    assert "fit: choosing the spread" in err.getvalue() and choice.detector.spread == 1

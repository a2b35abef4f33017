"""Progress bars (atpatch/progress.py): on a terminal's stderr for the long jobs, nothing in logs or pipes."""

from __future__ import annotations

import io
import sys

import graphs
import numpy as np
import pytest

from atpatch.detector.columns import collect_columns
from atpatch.detector.probe import AttentionProbe
from atpatch.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _feeds(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, 3, 5, 4)
    return {
        **{name: rng.standard_normal(shape).astype(np.float32) for name in ("q", "k", "v")},
        "cls": rng.standard_normal((batch, 2)).astype(np.float32),
    }


@pytest.mark.parametrize("terminal", [True, False])
def test_a_bar_is_drawn_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(3, "fit: clean inputs", unit="input") as bar:
        for _ in range(3):
            bar.step("going")
        assert (bar.bar is not None and bar.bar.n == 3) == terminal
    text = err.getvalue()
    # tqdm redraws at most every 0.1 s and clears the bar when done: the first draw is what shows here.
    assert ("fit: clean inputs" in text and "0/3" in text) == terminal, text
    assert terminal or text == ""


def test_fit_reads_columns_under_a_bar_and_gets_the_same_columns(
    monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    """The bar counts inputs (70, in batches of 64), not batches, and changes nothing it measures."""
    probe = AttentionProbe(graphs.attention_and_classifier())
    feeds = _feeds(rng, 70)
    quiet = collect_columns(probe, feeds)
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    shown = collect_columns(probe, feeds, desc="fit: calibration inputs")
    assert "fit: calibration inputs" in err.getvalue() and "0/70" in err.getvalue()
    for a, b in zip(quiet.features, shown.features, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(quiet.example, shown.example)

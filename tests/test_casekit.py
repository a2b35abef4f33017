"""benchmarks/casekit.py's notes: what a published table says about how its latency was measured."""

from __future__ import annotations

import os
import sys

from benchmark_runs import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import casekit  # noqa: E402


def _row(method: str, load: float | None) -> casekit.Row:
    timed = casekit.Latency(1.02, 1.1, 5.0, 32, 1.9, 2.2, 9.0, 32, 32, load=load)
    return casekit.Row(method, "ASR", 1.0, 0.01, 0.8, 0.8, 0.002, latency=timed)


def test_the_latency_note_gives_the_load_it_was_timed_under_and_says_when_it_was_shared() -> None:
    cores = os.cpu_count() or 1
    quiet = casekit.latency_note([_row("a", 0.25), _row("b", cores - 0.5)])
    assert f"load average 0.2–{cores - 0.5:.1f} on {cores} cores while timing" in quiet
    assert "noisy" not in quiet
    busy = casekit.latency_note([_row("a", 0.25), _row("b", cores + 1.5)])
    assert f"0.2–{cores + 1.5:.1f} on {cores} cores while timing (other work shared the cores" in busy
    # Rows timed before the load was recorded say nothing about it rather than a made-up figure.
    assert "load average" not in casekit.latency_note([_row("a", None)])

"""What every real-model benchmark case shares: running the atpatch commands, checking the
native kernel against the ONNX function, timing patched vs original side by side, and
publishing the results table into benchmarks/README.md (generated, never typed by hand).

A case script builds its model and data, then hands `Row`s to `publish`; the README section
between `<!-- results:KEY -->` and `<!-- /results:KEY -->` is replaced by the new table, and
the raw figures go to `benchmarks/results/KEY.json` next to the command and seed that made them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"


class CommandFailed(Exception):
    pass


def cli(*args: str, native: bool | None = None) -> str:
    """Run `atpatch ARGS` as a user would; raise CommandFailed with its one-line error."""
    env = dict(os.environ)
    if native is not None:
        env["ATPATCH_NATIVE"] = "1" if native else "0"
    done = subprocess.run([sys.executable, "-m", "atpatch.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise CommandFailed(lines[-1])
    return done.stdout


def _batches(feeds: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in feeds.items()}


def _session_feeds(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: ANN001
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def logits(model: Path, feeds: dict[str, np.ndarray], native: bool | None = None, batch: int = 64) -> np.ndarray:
    """The model's first output over `feeds`, in batches, through onnxruntime."""
    from atpatch.runtime import create_session

    session = create_session(model, use_native=native)
    feeds = _session_feeds(session, feeds)
    return np.concatenate([session.run(None, part)[0] for part in _batches(feeds, batch)])


@dataclass(frozen=True)
class Agreement:
    inputs: int
    max_abs_diff: float  # between the native kernel's and the ONNX function's logits
    differing_predictions: int

    def __str__(self) -> str:
        same = "same predictions" if self.differing_predictions == 0 else f"{self.differing_predictions} differ"
        return f"{same}, max |Δlogit| {self.max_abs_diff:.1e}"


def native_vs_function(patched: Path, feeds: dict[str, np.ndarray]) -> Agreement:
    """Run the patched model with the native kernel and with its ONNX function on the same inputs."""
    a, b = logits(patched, feeds, native=True), logits(patched, feeds, native=False)
    return Agreement(len(a), float(np.abs(a - b).max()), int((a.argmax(1) != b.argmax(1)).sum()))


@dataclass(frozen=True)
class Latency:
    native: float  # median over rounds of patched / original wall time, native kernel
    function: float  # the same with the ONNX function
    original_ms: float  # median wall time of one original batch

    def __str__(self) -> str:
        return f"{self.native:.2f}× / {self.function:.2f}×"


def latency(original: Path, patched: Path, feeds: dict[str, np.ndarray], rounds: int = 200) -> Latency:
    """Patched vs original on one batch, interleaved round by round so machine noise hits both.

    Many rounds: the small models here run a batch in about a millisecond, where 15 rounds gave
    ratios from 0.74x to 1.41x for the same model on a shared machine."""
    from atpatch.runtime import create_session

    sessions = {
        "original": create_session(original, use_native=False),
        "native": create_session(patched, use_native=True),
        "function": create_session(patched, use_native=False),
    }
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds + 2):  # the first two rounds warm up
        for name, session in sessions.items():
            part = _session_feeds(session, feeds)
            start = time.perf_counter()
            session.run(None, part)
            times[name].append(time.perf_counter() - start)
    t = {k: np.asarray(v[2:]) for k, v in times.items()}
    return Latency(
        native=float(np.median(t["native"] / t["original"])),
        function=float(np.median(t["function"] / t["original"])),
        original_ms=float(np.median(t["original"]) * 1e3),
    )


@dataclass(frozen=True)
class Row:
    """One line of a case's table: a method (atpatch with some detector, or a baseline)."""

    method: str
    metric: str  # "ASR", "flip rate", "parity gap"
    before: float
    after: float
    cacc_before: float
    cacc_after: float
    clean_flagged: float | None = None  # share of clean inputs with any column flagged
    latency: str = "—"  # patched/original, "native / function"
    agreement: str = "—"  # native kernel vs ONNX function
    note: str = ""


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def table(rows: list[Row]) -> str:
    head = (
        "| method | metric | original → patched | clean acc. original → patched | clean flagged "
        "| latency (native / function) | native vs function |"
    )
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.metric} | {_pct(r.before)} → {_pct(r.after)} | "
            f"{_pct(r.cacc_before)} → {_pct(r.cacc_after)} | {_pct(r.clean_flagged)} | {r.latency} | {r.agreement} |"
        )
    return "\n".join(lines)


def publish(key: str, title: str, command: str, seed: int, setup: str, rows: list[Row], notes: list[str]) -> str:
    """Write results/KEY.json and replace the case's section of benchmarks/README.md.

    Returns the Markdown section. A smoke run should not call this: its numbers mean nothing.
    """
    stamp = time.strftime("%Y-%m-%d")
    section = "\n".join(
        [
            f"### {title}",
            "",
            f"`{command}` — seed {seed}, run {stamp}. {setup}",
            "",
            table(rows),
            "",
            *[f"- {n}" for n in notes],
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    raw = {"key": key, "command": command, "seed": seed, "date": stamp, "setup": setup,
           "rows": [asdict(r) for r in rows], "notes": notes}  # fmt: skip
    _write_atomic(RESULTS / f"{key}.json", json.dumps(raw, indent=1) + "\n")
    text = README.read_text(encoding="utf-8") if README.is_file() else "# Benchmarks\n"
    start, end = f"<!-- results:{key} -->", f"<!-- /results:{key} -->"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    _write_atomic(README, text)
    return section


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

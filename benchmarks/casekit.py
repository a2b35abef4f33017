"""What every real-model benchmark case shares: running the atpatch commands, exporting each
detector cross-layer (the default) and per layer, checking the native kernel against the ONNX function, timing patched
vs original on clean (one pass) and flagged (two passes) batches, the issue's targets in words,
and publishing the results table into benchmarks/README.md (generated, never typed by hand).

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


# onnxruntime's pool threads keep spinning after a run ends; when sessions take turns, as in a
# round robin of variants, they take the cores from the next session's run, which no one-model
# server sees. The 4-layer ViT at batch 32 timed 25.6 ms unpatched and 3.4x flagged that way,
# 8.9 ms and 2.3x with the spinning stopped at each run's end (benchmarks/latency.py, 2026-12-03).
QUIET_BETWEEN_RUNS = {"session.force_spinning_stop": "1"}


class CommandFailed(Exception):
    pass


def bucket(value: int, edges: list[tuple[int, str]], last: str) -> str:
    """A tabular count as a token word: the name of the first edge it is under, else `last`."""
    for edge, name in edges:
        if value < edge:
            return name
    return last


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


def _take(feeds: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[rows]) for k, v in feeds.items()}


@dataclass(frozen=True)
class Latency:
    """Patched / original wall time, median over interleaved rounds, for two batches: clean inputs
    nothing flags (one pass) and triggered inputs the detector flags (the second pass runs)."""

    native: float  # clean batch: median of patched / original, native kernel
    function: float  # the same with the ONNX function
    original_ms: float  # median wall time of the original on the clean batch
    batch: int  # inputs per batch
    flagged_native: float | None = None  # flagged batch (None: the detector flags no triggered input)
    flagged_function: float | None = None
    flagged_original_ms: float | None = None
    flagged_distinct: int = 0  # distinct flagged inputs in the flagged batch (repeated to fill it when fewer)
    clean_distinct: int = 0  # distinct unflagged clean inputs in the clean batch
    load: float | None = None  # the highest 1-minute load average seen while timing (None: not measured)

    def __str__(self) -> str:
        return f"{self.native:.2f}× / {self.function:.2f}×"

    def flagged(self) -> str:
        if self.flagged_native is None or self.flagged_function is None:
            return "—"
        return f"{self.flagged_native:.2f}× / {self.flagged_function:.2f}×"


def _pick(probe, feeds: dict[str, np.ndarray], want: bool, size: int) -> np.ndarray:  # noqa: ANN001
    """Up to `size` rows of `feeds` that make a batch run the second pass (`want`) or not, in order: those
    whose outputs come from it, and those the effect check tries whatever it then keeps."""
    found: list[int] = []
    for part, out in probe.iter_batches(probe.model_feeds(feeds), 64):
        runs = out.second_pass if out.tried is None else out.second_pass | out.tried
        found.extend(part.start + np.flatnonzero(runs == want))
        if len(found) >= size:
            break
    return np.asarray(found[:size], np.int64)


def _fill(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` repeated to `size` entries (a batch of the usual size even when few inputs qualify)."""
    return np.resize(rows, size) if 0 < len(rows) < size else rows


def latency(
    original: Path,
    patched: Path,
    clean: dict[str, np.ndarray],
    triggered: dict[str, np.ndarray] | None = None,
    rounds: int = 200,
    size: int = 32,
) -> Latency:
    """Time `patched` (a cross-layer patched model) against `original`, the one way every case does.

    Two batches of `size`: clean inputs on which the patched model flags nothing and the effect check
    tries nothing (one pass) and triggered inputs that run the second pass (flagged or tried). Each
    round runs original, native kernel and ONNX function on both batches, interleaved, so machine noise
    hits all of them; the ratios are medians over rounds.
    Many rounds: the small models here run a batch in about a millisecond, where 15 rounds gave
    ratios from 0.74x to 1.41x for the same model on a shared machine."""
    import onnx

    from atpatch.detector.probe import AttentionProbe
    from atpatch.runtime import create_session

    probe = AttentionProbe(onnx.load(str(patched)), use_native=False)
    clean_rows = _pick(probe, clean, False, size)
    if len(clean_rows) == 0:
        raise ValueError(f"the patched model {patched.name} flags every clean input: no clean batch to time")
    batches = {"clean": _take(clean, _fill(clean_rows, size))}
    flagged_rows = np.zeros(0, np.int64)
    if triggered is not None:
        flagged_rows = _pick(probe, triggered, True, size)
        if len(flagged_rows):
            batches["flagged"] = _take(triggered, _fill(flagged_rows, size))
    sessions = {
        "original": create_session(original, use_native=False, config=QUIET_BETWEEN_RUNS),
        "native": create_session(patched, use_native=True, config=QUIET_BETWEEN_RUNS),
        "function": create_session(patched, use_native=False, config=QUIET_BETWEEN_RUNS),
    }
    times: dict[tuple[str, str], list[float]] = {(b, s): [] for b in batches for s in sessions}
    warmup = 2 if rounds >= 3 else 0  # fewer rounds: a smoke run, checking the wiring only
    load = os.getloadavg()[0]
    for _ in range(rounds + warmup):
        for b, feeds in batches.items():
            for name, session in sessions.items():
                part = _session_feeds(session, feeds)
                start = time.perf_counter()
                session.run(None, part)
                times[b, name].append(time.perf_counter() - start)
    t = {k: np.asarray(v[warmup:]) for k, v in times.items()}
    load = max(load, os.getloadavg()[0])

    def ratio(b: str, name: str) -> float:
        return float(np.median(t[b, name] / t[b, "original"]))

    flagged = "flagged" in batches
    return Latency(
        native=ratio("clean", "native"),
        function=ratio("clean", "function"),
        original_ms=float(np.median(t["clean", "original"]) * 1e3),
        batch=size,
        flagged_native=ratio("flagged", "native") if flagged else None,
        flagged_function=ratio("flagged", "function") if flagged else None,
        flagged_original_ms=float(np.median(t["flagged", "original"]) * 1e3) if flagged else None,
        flagged_distinct=len(flagged_rows),
        clean_distinct=len(clean_rows),
        load=load,
    )


def export_both(model: Path, detector: Path, stem: Path) -> tuple[Path, Path]:
    """`atpatch-export` the detector as users get it (cross-layer, the default) and with --per-layer,
    to show what cross-layer patching buys; returns (cross-layer model, per-layer model)."""
    cross, per = stem.with_name(stem.name + ".patched.onnx"), stem.with_name(stem.name + ".per-layer.onnx")
    cli("export", str(model), "--detector", str(detector), "-o", str(cross))
    cli("export", str(model), "--detector", str(detector), "--per-layer", "-o", str(per))
    return cross, per


def fit_summary(printed: str) -> str:
    """What `atpatch fit` said about the misbehaving inputs: how many the patch fixes, the spread, the effect check."""
    keep = ("spread:", "effect check:", "misbehaving inputs fixed", "to fix more:")
    return "; ".join(line.strip() for line in printed.splitlines() if line.strip().startswith(keep))


@dataclass(frozen=True)
class Row:
    """One line of a case's table: a method (atpatch with some detector, or a baseline)."""

    method: str
    metric: str  # "ASR", "flip rate", "parity gap"
    before: float
    after: float  # with the detector patched as atpatch-export writes it (cross-layer)
    cacc_before: float
    cacc_after: float
    clean_flagged: float | None = None  # share of clean inputs with any column flagged
    per_layer: float | None = None  # `metric` with the same detector patched per layer (--per-layer)
    latency: Latency | None = None  # patched/original: clean (one pass) and flagged (two passes) batches
    agreement: str = "—"  # native kernel vs ONNX function
    floor: float | None = None  # ASR with the trigger replaced by a neutral stand-in (None: no trigger)
    oracle: float | None = None  # ASR with the true trigger positions patched in every layer, no detector
    note: str = ""


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def table(rows: list[Row]) -> str:
    """The Markdown table, and under it the case's reference ASRs (floor, oracle) when it has any."""
    head = (
        "| method | metric | original → patched | per-layer patch | clean acc. original → patched | clean flagged "
        "| latency clean, 1 pass (native / function) | latency flagged, 2 passes (native / function) "
        "| native vs function |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.metric} | {_pct(r.before)} → {_pct(r.after)} | {_pct(r.per_layer)} | "
            f"{_pct(r.cacc_before)} → {_pct(r.cacc_after)} | {_pct(r.clean_flagged)} | "
            f"{r.latency if r.latency else '—'} | {r.latency.flagged() if r.latency else '—'} | {r.agreement} |"
        )
    ref = next((r for r in rows if r.floor is not None or r.oracle is not None), None)
    if ref is not None:
        lines += [
            "",
            f"Reference ASRs: **floor {_pct(ref.floor)}** (the trigger replaced by a neutral stand-in of the same "
            f"size at the same place: victims that flip anyway, which no attention patch can undo); **oracle "
            f"{_pct(ref.oracle)}** (no detector: the true trigger positions patched in every layer, by "
            "`atpatch.evaluate.oracle_logits`; `atpatch eval` shows it when every victim's culprits are known).",
        ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    measured: str  # what was measured, e.g. "ASR 99.9% → 0.13%"
    met: bool
    goal: str  # e.g. "≤ 0.5%"


def verdict(method: str, targets: list[Target]) -> str:
    """One note line: each target of the issue, met or missed, with the measured figure."""
    return f"{method}: " + "; ".join(f"{t.measured} ({'met' if t.met else 'missed'}: {t.goal})" for t in targets)


def backdoor_verdict(row: Row, asr_max: float, asr_goal: str) -> str:
    """The backdoor cases' targets for an atpatch row: ASR ≤ `asr_max` (described by `asr_goal`),
    clean accuracy drop ≤ 0.3 pt, clean flag rate ≤ 0.5%."""
    drop = 100 * (row.cacc_before - row.cacc_after)
    flagged = row.clean_flagged if row.clean_flagged is not None else 1.0
    tol = 1e-9  # figures that equal a target meet it, whatever the float rounding
    return verdict(
        row.method,
        [
            Target(f"ASR {row.before:.1%} → {row.after:.2%}", row.after <= asr_max + tol, asr_goal),
            Target(f"clean acc. drop {drop:.2f} pt", drop <= 0.3 + tol, "≤ 0.3 pt"),
            Target(f"clean flagged {flagged:.2%}", flagged <= 0.005 + tol, "≤ 0.5%"),
        ],
    )


def latency_note(rows: list[Row], pool: str = "triggered inputs") -> str:
    """How the latency columns were measured, with the batches actually used (flagged ones drawn from `pool`)."""
    timed = [(r.method, r.latency) for r in rows if r.latency is not None]
    timed = list(dict(timed).items())  # a method with several metric rows counts once
    if not timed:
        return ""
    batch = timed[0][1].batch
    few = [f"{method} {t.flagged_distinct}" for method, t in timed if 0 < t.flagged_distinct < t.batch]
    none = [method for method, t in timed if t.flagged_distinct == 0]
    text = (
        f"Latency: patched / original wall time, median over interleaved rounds, on a batch of {batch} clean inputs "
        f"the patched model flags nothing in and its effect check tries none of (one pass) and on a batch of {batch} "
        f"{pool} it flags or tries (the second pass runs)"
    )
    if few:
        text += f"; where fewer are flagged they are repeated to fill the batch ({', '.join(few)} distinct)"
    if none:
        text += f"; no flagged batch for {', '.join(none)} (it flags none of them)"
    loads = [t.load for _, t in timed if t.load is not None]
    if loads:
        cores = os.cpu_count() or 1
        text += f"; load average {min(loads):.1f}–{max(loads):.1f} on {cores} cores while timing"
        if max(loads) > cores:
            text += " (other work shared the cores: the ratios are noisy)"
    return text + "."


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
    write_atomic(RESULTS / f"{key}.json", json.dumps(raw, indent=1) + "\n")
    publish_section(key, section)
    return section


def publish_section(key: str, section: str) -> None:
    """Replace benchmarks/README.md's section between `<!-- results:KEY -->` and its end (or append it)."""
    text = README.read_text(encoding="utf-8") if README.is_file() else "# Benchmarks\n"
    start, end = f"<!-- results:{key} -->", f"<!-- /results:{key} -->"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_atomic(README, text)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- Experiments that read a finished case's cache (joint_detection.py, detection_bound.py) ----------


def cached_model_folder(work: Path) -> Path:
    """The Hugging Face folder a finished case left in its cache folder `work`."""
    found = [p.parent for p in work.glob("*/config.json")]
    if len(found) != 1:
        sys.exit(f"{work}: expected one model folder (*/config.json) in the case's cache, found {len(found)}")
    return found[0]


def load_cached_set(work: Path, name: str, folder: Path):  # noqa: ANN201
    """One of the case's data sets (`name`.npz or `name`.jsonl), as `atpatch fit/eval` read it."""
    from atpatch.data import load_jsonl, load_npz

    for suffix, loader in ((".npz", load_npz), (".jsonl", load_jsonl)):
        if (work / f"{name}{suffix}").is_file():
            return loader(work / f"{name}{suffix}", folder)
    sys.exit(f"{work} has no {name}.npz or {name}.jsonl: run the benchmark case first")


def record_case(out: Path, case: str, measured: object) -> dict:
    """Put one case's figures into the results file `out` (other cases kept); every case recorded there."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[case] = measured
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(results, indent=1) + "\n")
    return results

"""Would one score over all layers find multi-position triggers that today's per-layer flags miss?

Today a position is flagged when any layer's detector scores it above that layer's threshold (the
thresholds share the clean-flag budget). This script reads a finished benchmark case's cache (its
model, a fitted detector, its calibration, clean and triggered sets) and compares, at the same
budget, rules computed from the same per-layer column scores (this experiment led to the joint rule
`atpatch fit` now offers, ops/joint.py: "sum z" and "sum z, pooled" with each layer's spread taken from
the clean fitting columns, calibrated with the layers' thresholds):

  - per layer: today's rule, with the thresholds in the detector file;
  - max z / sum z: each layer's scores standardised on the calibration set's real columns, then
    the max or the sum over layers, one threshold;
  - sum z, pooled: the sum averaged over neighbour windows (2 along a sequence, 2x2 on a patch
    grid), each position taking its best window: a trigger spread over neighbours scores together.

One threshold is the (1 - budget) quantile of the calibration inputs' highest score. Reported on
the held-out sets: clean inputs flagged, triggered inputs with any culprit position flagged, and
with every culprit position flagged (what the oracle patches). Nothing is exported or patched.

    python benchmarks/text_backdoor.py --trigger sentence       # first: the case's cache
    python benchmarks/joint_detection.py benchmarks/.cache/text_backdoor/sentence-full-seed0 culprits
    python benchmarks/joint_detection.py benchmarks/.cache/vision_backdoor/random-full-seed0 localized
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import casekit  # noqa: E402

RESULTS = casekit.RESULTS / "joint_detection.json"
TITLE = "Experiment: one score over all layers, for multi-position triggers"
EXPLAINED = (
    "Not a patch: what rules over all layers would flag (the joint rule, ops/joint.py, is the last two), "
    "from the same per-layer column scores as a "
    "finished case's fitted detector, at the same clean budget (`benchmarks/joint_detection.py`, its "
    "docstring says how). *per layer (today)*: any layer above its own threshold, as the patched model "
    "flags; *max z* / *sum z*: each layer's scores standardised on the calibration set, then the max or the "
    "sum over layers, one threshold at the budget; *pooled*: the sum averaged over neighbour windows (2 "
    "along a sequence, 2x2 on a patch grid). Rates on the held-out clean and triggered sets; *every culprit "
    "flagged* is what the oracle patches. Flags are counted before the spread `atpatch fit` may add (the "
    "sentence case's detector also patches the tokens within 2 of a flagged one, which is why one flagged "
    "token of five is enough there)."
)
BUDGETS = (0.005, 0.05)


def column_scores(work: Path, detector: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], bool]:
    """Per set: scores [N, layers, keys], real key positions [N, keys], culprit positions [N, keys]; and
    whether the keys are image patches (no attention mask)."""
    import onnx

    from atpatch.detector.probe import AttentionProbe
    from atpatch.ops import reference
    from atpatch.ops.weights import Detector

    folder = casekit.cached_model_folder(work)
    layers = Detector.load(work / f"{detector}.safetensors").layers
    probe = AttentionProbe(onnx.load(str(work / "model.onnx")))
    out, patches = {}, True
    for name in ("calibration", "clean", "triggered"):
        data = casekit.load_cached_set(work, name, folder)
        parts = []
        for start in range(0, len(data), 64):
            maps = probe.run({k: v[start : start + 64] for k, v in data.feeds.items()}).before
            parts.append(np.stack([reference.column_scores(m, d) for m, d in zip(maps, layers, strict=True)], 1))
        scores = np.concatenate(parts)
        real = np.ones((len(data), scores.shape[2]), bool)
        if "attention_mask" in data.feeds:
            real &= data.feeds["attention_mask"].astype(bool)
            patches = False
        real[:, 0] = False  # [CLS]: never a trigger here, and the detector never flags it on clean inputs
        culprits = np.zeros_like(real)
        for i, positions in enumerate(data.culprits):
            culprits[i, [p for p in positions or [] if p < culprits.shape[1]]] = True
        out[name] = (scores, real, culprits)
    return out, patches


def _pooled(joint: np.ndarray, real: np.ndarray, patches: bool) -> np.ndarray:
    """Each position's best mean over the neighbour windows that contain it (2 along a sequence, 2x2 on a grid
    after the grid's special positions), as the joint rule pools (ops/joint.py)."""
    from atpatch.ops.joint import pool

    return pool(np.where(real, joint, -30.0), patches)


def rules(sets: dict, detector_thresholds: np.ndarray, patches: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per rule, per set: a joint score [N, keys] (or, for today's rule, flags)."""
    cal_scores, cal_real, _ = sets["calibration"]
    live = np.where(cal_real[:, None, :], cal_scores, np.nan)
    mu, sd = np.nanmean(live, (0, 2)), np.nanstd(live, (0, 2)) + 1e-6
    out: dict[str, dict[str, np.ndarray]] = {"per layer (today)": {}, "max z": {}, "sum z": {}, "sum z, pooled": {}}
    for name, (scores, real, _) in sets.items():
        z = (scores - mu[None, :, None]) / sd[None, :, None]
        out["per layer (today)"][name] = (scores > detector_thresholds[None, :, None]).any(1).astype(np.float64)
        out["max z"][name] = z.max(1)
        out["sum z"][name] = z.sum(1)
        out["sum z, pooled"][name] = _pooled(z.sum(1), real, patches)
    return out


def measure(sets: dict, joint: dict[str, np.ndarray], budget: float | None) -> dict[str, float]:
    """Rates at one threshold: the calibration set's (1 - budget) quantile (None: today's flags, > 0.5)."""
    if budget is None:
        threshold = 0.5
    else:
        cal_real = sets["calibration"][1]
        threshold = float(np.quantile(np.where(cal_real, joint["calibration"], -np.inf).max(1), 1 - budget))
    rates = {}
    for name in ("clean", "triggered"):
        _, real, culprits = sets[name]
        flags = (joint[name] > threshold) & real
        rates[f"{name}_flagged"] = float(flags.any(1).mean())
        if name == "triggered":
            rates["culprit_hit"] = float((flags & culprits).any(1).mean())
            rates["every_culprit"] = float((flags | ~culprits).all(1).mean())
    return rates


def _table(case: str, rows: list[dict]) -> str:
    lines = [
        f"**{case}** (`{rows[0]['command']}`)" if rows and "command" in rows[0] else f"**{case}**",
        "",
        "| rule | budget | clean flagged | triggered flagged | culprit flagged | every culprit flagged |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        budget = "fitted" if r["budget"] is None else f"{r['budget']:.1%}"
        lines.append(
            f"| {r['rule']} | {budget} | {r['clean_flagged']:.2%} | {r['triggered_flagged']:.2%} | "
            f"{r['culprit_hit']:.2%} | {r['every_culprit']:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="a benchmark case's cache folder (model.onnx, sets, detectors)")
    parser.add_argument("detector", help="the detector file's stem in that folder, e.g. localized or culprits")
    parser.add_argument("--out", type=Path, help="write the results here and leave the published ones alone")
    args = parser.parse_args()
    from atpatch.ops.weights import Detector

    if not (args.work / f"{args.detector}.safetensors").is_file():
        sys.exit(f"{args.work / args.detector}.safetensors does not exist: run the benchmark case first")
    sets, patches = column_scores(args.work, args.detector)
    thresholds = np.array([d.threshold for d in Detector.load(args.work / f"{args.detector}.safetensors").layers])
    command = " ".join(["python benchmarks/joint_detection.py", *sys.argv[1:]])
    rows = []
    for rule, joint in rules(sets, thresholds, patches).items():
        for budget in (None,) if rule.startswith("per layer") else BUDGETS:
            rows.append({"rule": rule, "budget": budget, **measure(sets, joint, budget), "command": command})
    case = f"{args.work.parent.name}/{args.work.name}/{args.detector}"
    print(_table(case, rows))
    results = casekit.record_case(args.out or RESULTS, case, rows)
    if args.out is None:  # the published figures: every case measured so far, as one README section
        section = [f"### {TITLE}", "", EXPLAINED]
        section += ["", *(_table(c, r) + "\n" for c, r in sorted(results.items()))]
        casekit.publish_section("joint_detection", "\n".join(section).rstrip())


if __name__ == "__main__":
    main()

"""Fairness fit: choose the detector's thresholds by the unfair decisions they undo, at what cost in accuracy.

A clean flag budget (calibrate.py) is the right knob for a backdoor, whose trigger is rare in clean
inputs. A protected attribute (e.g. sex) is in every input, so what a user weighs is different: how
many predictions still change when only the attribute changes (the counterfactual flip rate), and
how much accuracy the patch costs. `sweep` calibrates the fitted detector for a grid of clean flag
budgets, runs each patched model on labelled validation rows and on the same rows with the attribute
flipped, and keeps the budget with the fewest flips among those that keep accuracy within a tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from ..data import Dataset
from ..errors import AtPatchError
from ..group_gaps import group_gaps
from ..ops.weights import Detector
from .calibrate import NEVER

__all__ = ["GRID", "FairnessOptions", "Point", "Tradeoff", "check_rows", "report_paths", "sweep"]

GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # clean flag budgets tried, besides flagging nothing


@dataclass(frozen=True)
class FairnessOptions:
    """What `atpatch fit --protected` needs beyond a plain fit; checks itself (one-line errors naming the fix)."""

    validation: Path | None
    counterfactual: Path | None
    group_field: str | None = None
    max_accuracy_drop: float = 0.3  # percentage points of validation accuracy

    def __post_init__(self) -> None:
        missing = [f"--{name} FILE" for name in ("validation", "counterfactual") if getattr(self, name) is None]
        if missing:
            raise AtPatchError(
                f"--protected needs {' and '.join(missing)}: labelled validation rows and the same rows with the "
                f"protected attribute flipped (JSONL, same order)"
            )
        if not 0 <= self.max_accuracy_drop <= 100:
            raise AtPatchError(
                f"--max-accuracy-drop {self.max_accuracy_drop} must be between 0 and 100 percentage points, e.g. 0.3"
            )


def report_paths(output: Path) -> tuple[Path, Path]:
    """The trade-off's plot and figures, next to the detector: `<stem>.tradeoff.png`, `<stem>.tradeoff.json`."""
    return output.with_name(f"{output.stem}.tradeoff.png"), output.with_name(f"{output.stem}.tradeoff.json")


@dataclass(frozen=True)
class Point:
    """One model on the validation rows: the original, or the patch calibrated to one clean flag budget."""

    name: str  # "original", "nothing flagged", or the budget, e.g. "2%"
    target_flag_rate: float | None  # the clean flag budget calibrated to (None: original; 0: nothing flagged)
    accuracy: float
    counterfactual_flip_rate: float
    validation_flag_rate: float  # validation rows with any flagged column (in any layer)
    parity_gap: float | None
    feasible: bool = True  # accuracy within the tolerance of the original's
    thresholds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Tradeoff:
    original: Point
    candidates: tuple[Point, ...]
    chosen: int  # index into candidates
    detectors: tuple[Detector, ...]  # one per candidate
    max_accuracy_drop: float  # percentage points
    n_validation: int

    @property
    def detector(self) -> Detector:
        return self.detectors[self.chosen]

    def table(self) -> str:
        def pct(value: float | None) -> str:
            return "—" if value is None else f"{value:.2%}"

        floor = self.original.accuracy - self.max_accuracy_drop / 100
        lines = [
            f"{'clean flag budget':>18} | {'val. flagged':>12} | {'flip rate':>9} | {'parity gap':>10} | "
            f"{'accuracy':>8} |",
        ]
        lines.append("-" * len(lines[0]))
        for i, p in enumerate((self.original, *self.candidates)):
            mark = "" if i == 0 else ("<- chosen" if i - 1 == self.chosen else ("" if p.feasible else "acc. too low"))
            lines.append(
                f"{p.name:>18} | {pct(p.validation_flag_rate if i else None):>12} | "
                f"{pct(p.counterfactual_flip_rate):>9} | {pct(p.parity_gap):>10} | {pct(p.accuracy):>8} | {mark}"
            )
        return (
            "\n".join(lines) + f"\n{self.n_validation} validation rows; accuracy kept at or above {floor:.2%} "
            f"(original - {self.max_accuracy_drop:g} points); chosen: the lowest flip rate, then the fewest flags\n"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "n_validation": self.n_validation,
            "max_accuracy_drop_points": self.max_accuracy_drop,
            "accuracy_floor": self.original.accuracy - self.max_accuracy_drop / 100,
            "original": asdict(self.original),
            "candidates": [{**asdict(p), "chosen": i == self.chosen} for i, p in enumerate(self.candidates)],
            "chosen": self.chosen,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def write_png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        points = sorted(self.candidates, key=lambda p: p.validation_flag_rate)
        x = [100 * p.validation_flag_rate for p in points]
        chosen = self.candidates[self.chosen]
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 6.0))
        top.plot(x, [100 * p.accuracy for p in points], "o-", label="validation accuracy")
        floor = 100 * self.original.accuracy - self.max_accuracy_drop
        top.axhline(floor, color="grey", linestyle="--", label=f"original - {self.max_accuracy_drop:g} points")
        top.plot([100 * chosen.validation_flag_rate], [100 * chosen.accuracy], "r*", markersize=14, label="chosen")
        top.set_ylabel("accuracy (%)")
        top.legend(loc="best", fontsize="small")
        bottom.plot(x, [100 * p.counterfactual_flip_rate for p in points], "o-", label="counterfactual flip rate")
        if chosen.parity_gap is not None:
            gaps = [100 * (p.parity_gap or 0.0) for p in points]
            bottom.plot(x, gaps, "s--", label="demographic-parity gap")
        bottom.plot([100 * chosen.validation_flag_rate], [100 * chosen.counterfactual_flip_rate], "r*", markersize=14)
        bottom.set_xlabel("validation rows flagged (%)")
        bottom.set_ylabel("rate (%)")
        bottom.legend(loc="best", fontsize="small")
        fig.suptitle("atpatch fit --protected: fairness against accuracy")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)


def _predict_original(model: onnx.ModelProto, data: Dataset, batch_size: int) -> np.ndarray:
    from ..evaluate import run_original
    from ..runtime import create_session

    return run_original(create_session(model), data, "validation", batch_size).logits.argmax(axis=1)


def _predict_patched(
    model: onnx.ModelProto, detector: Detector, sets: tuple[Dataset, ...], batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per set: the patched model's predictions and whether any column was flagged (as `atpatch eval` reads them)."""
    from ..evaluate import run_patched
    from ..rewrite import patch_model
    from .probe import AttentionProbe

    probe = AttentionProbe(patch_model(model, detector)[0])
    runs = [run_patched(probe, data, "validation", batch_size) for data in sets]
    return [(run.logits.argmax(axis=1), run.flagged) for run in runs]


def _point(
    name: str,
    rate: float | None,
    validation: Dataset,
    pred: np.ndarray,
    flipped: np.ndarray,
    flagged: np.ndarray,
    group: np.ndarray | None,
    thresholds: tuple[float, ...] = (),
) -> Point:
    gap = None if group is None else group_gaps(pred, validation.labels, group)["parity_gap"]
    return Point(
        name=name,
        target_flag_rate=rate,
        accuracy=float((pred == validation.labels).mean()),
        counterfactual_flip_rate=float((pred != flipped).mean()),
        validation_flag_rate=float(flagged.mean()),
        parity_gap=gap,
        thresholds=thresholds,
    )


def check_rows(validation: Dataset, counterfactual: Dataset, group: np.ndarray | None) -> None:
    """Refuse validation rows that cannot be compared with their counterfactual (checked before fitting)."""
    if len(counterfactual) != len(validation):
        raise AtPatchError(
            f"--counterfactual has {len(counterfactual)} rows but --validation has {len(validation)}; give the "
            f"validation rows with the attribute flipped, in the same order"
        )
    if group is not None and (len(group) != len(validation) or len(np.unique(group)) < 2):
        raise AtPatchError("--group-field must give 0 or 1 on every validation row, with both groups present")


def sweep(
    model: onnx.ModelProto,
    calibrated: Callable[[float], Detector],
    validation: Dataset,
    counterfactual: Dataset,
    group: np.ndarray | None = None,
    max_accuracy_drop: float = 0.3,
    grid: tuple[float, ...] = GRID,
    batch_size: int = 64,
) -> Tradeoff:
    """Calibrate (`calibrated(rate)`) and run the patched model for each budget in `grid`, plus the patch
    that flags nothing; choose the lowest flip rate among candidates whose validation accuracy is at least
    the original's less `max_accuracy_drop` points (ties: the fewest validation rows flagged, then the
    smallest budget)."""
    check_rows(validation, counterfactual, group)
    nothing = np.zeros(len(validation), bool)
    base, base_flipped = (_predict_original(model, d, batch_size) for d in (validation, counterfactual))
    original = _point("original", None, validation, base, base_flipped, nothing, group)
    floor = original.accuracy - max_accuracy_drop / 100 - 1e-12  # 1e-12: the same count is never infeasible

    detectors = [calibrated(rate) for rate in grid]
    off = detectors[0] if detectors else calibrated(0.005)
    detectors.append(replace(off, layers=tuple(replace(lay, threshold=NEVER) for lay in off.layers)))
    names = [f"{rate:.1%}".replace(".0%", "%") for rate in grid] + ["nothing flagged"]
    rates = [*grid, 0.0]
    seen: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    points = []
    for name, rate, detector in zip(names, rates, detectors, strict=True):
        thresholds = tuple(float(lay.threshold) for lay in detector.layers)
        if thresholds not in seen:  # budgets that calibrate alike are run once
            if all(t == NEVER for t in thresholds):  # nothing flagged: the maps pass through bit-identical
                seen[thresholds] = (base, base_flipped, nothing)
            else:
                (pred, flagged), (flipped, _) = _predict_patched(
                    model, detector, (validation, counterfactual), batch_size
                )
                seen[thresholds] = (pred, flipped, flagged)
        pred, flipped, flagged = seen[thresholds]
        point = _point(name, rate, validation, pred, flipped, flagged, group, thresholds)
        points.append(replace(point, feasible=point.accuracy >= floor))
    feasible = [i for i, p in enumerate(points) if p.feasible]  # "nothing flagged" always is
    # Ties: the fewest validation rows flagged, then the smallest clean budget (fewer unseen inputs flagged).
    chosen = min(feasible, key=lambda i: (points[i].counterfactual_flip_rate, points[i].validation_flag_rate, rates[i]))
    return Tradeoff(original, tuple(points), chosen, tuple(detectors), max_accuracy_drop, len(validation))

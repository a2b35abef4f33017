"""What `atpatch eval` reports: each model's figures, as a Markdown table and as JSON (evaluate.py measures them)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .ops.weights import Calibration

__all__ = ["EvalReport", "ModelMetrics"]


@dataclass(frozen=True)
class ModelMetrics:
    """One model's numbers; None where the data to compute it was not given.

    The equalized-odds gaps need a group with labels of both kinds: a group with no positive
    (no negative) label has no true-positive (false-positive) rate, and that gap is None.
    """

    clean_accuracy: float
    attack_success_rate: float | None = None
    counterfactual_flip_rate: float | None = None
    parity_gap: float | None = None
    parity_gap_above_floor: float | None = None  # parity_gap - EvalReport.parity_gap_floor
    tpr_gap: float | None = None  # |TPR(group 1) - TPR(group 0)|
    fpr_gap: float | None = None  # |FPR(group 1) - FPR(group 0)|
    equalized_odds_gap: float | None = None  # max(tpr_gap, fpr_gap); None if either is
    equalized_odds_gap_above_floor: float | None = None  # equalized_odds_gap - EvalReport.equalized_odds_gap_floor
    flag_rate_clean: float | None = None  # patched model only
    flag_rate_triggered: float | None = None  # patched model only
    culprit_flag_rate: float | None = None  # triggered inputs whose known culprit position is flagged


_SIGNED = {"parity_gap_above_floor", "equalized_odds_gap_above_floor"}  # differences: shown with their sign
_ROW_NAMES = {
    "clean_accuracy": "clean accuracy (CACC)",
    "attack_success_rate": "attack success rate (ASR)",
    "counterfactual_flip_rate": "counterfactual flip rate",
    "parity_gap": "demographic-parity gap",
    "parity_gap_above_floor": "demographic-parity gap above the floor",
    "tpr_gap": "true-positive-rate gap",
    "fpr_gap": "false-positive-rate gap",
    "equalized_odds_gap": "equalized-odds gap",
    "equalized_odds_gap_above_floor": "equalized-odds gap above the floor",
    "flag_rate_clean": "clean inputs flagged",
    "flag_rate_triggered": "triggered inputs flagged",
    "culprit_flag_rate": "triggered inputs with culprit flagged",
}


@dataclass(frozen=True)
class EvalReport:
    original: ModelMetrics
    patched: ModelMetrics
    identical_clean: float  # fraction of clean inputs whose logits are bit-identical
    n_clean: int
    n_triggered: int = 0
    n_counterfactual: int = 0
    target: int | None = None
    label_names: tuple[str, ...] = ()
    oracle_attack_success_rate: float | None = None  # known culprits patched in every layer, no detector
    parity_gap_floor: float | None = None  # the original's parity gap on the attribute-masked clean set
    equalized_odds_gap_floor: float | None = None  # likewise its equalized-odds gap
    calibration: Calibration | None = None  # what the patched model's thresholds promise (None: not recorded)
    clean_length: float = -1.0  # median tokens of the clean inputs (-1: images)
    # Per-set predictions {"clean"|"triggered"|"counterfactual": {"original"|"patched": [N]}} (and
    # "masked": {"original": [N]}: only the original runs on it) and the patched model's per-input
    # flags {"clean"|"triggered": bool [N]}; not in to_dict.
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    flags: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "original": asdict(self.original),
            "patched": asdict(self.patched),
            "identical_clean": self.identical_clean,
            "n_clean": self.n_clean,
            "n_triggered": self.n_triggered,
            "n_counterfactual": self.n_counterfactual,
            "target": self.target,
            "oracle_attack_success_rate": self.oracle_attack_success_rate,
            "parity_gap_floor": self.parity_gap_floor,
            "equalized_odds_gap_floor": self.equalized_odds_gap_floor,
            "calibration": None if self.calibration is None else self.calibration.describe(),
            "clean_length": self.clean_length,
            "target_name": self.label_names[self.target]
            if self.target is not None and self.target < len(self.label_names)
            else None,
            "label_names": list(self.label_names),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON, atomically (a half-written report never appears)."""
        from .modelio import atomic_output

        path = Path(path)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def to_markdown(self) -> str:
        def cell(value: float | None, signed: bool = False) -> str:
            return "—" if value is None else f"{100 * value:{'+' if signed else ''}.1f}%"

        lines = ["| metric | original | patched |", "|---|---:|---:|"]
        for key, name in _ROW_NAMES.items():
            a, b = getattr(self.original, key), getattr(self.patched, key)
            if a is None and b is None:
                continue  # not measured: no data given for it
            lines.append(f"| {name} | {cell(a, key in _SIGNED)} | {cell(b, key in _SIGNED)} |")
        lines.append(f"| clean outputs bit-identical | | {cell(self.identical_clean)} |")
        if self.oracle_attack_success_rate is not None:
            oracle = cell(self.oracle_attack_success_rate)
            lines.append(f"| ASR, known culprits patched in every layer (oracle) | | {oracle} |")
        for name, floor in (
            ("demographic-parity gap", self.parity_gap_floor),
            ("equalized-odds gap", self.equalized_odds_gap_floor),
        ):
            if floor is not None:
                lines.append(f"| {name} floor (original, attribute masked) | {cell(floor)} | |")
        counts = f"{self.n_clean} clean"
        if self.n_triggered:
            target = (
                self.label_names[self.target]
                if self.target is not None and self.target < len(self.label_names)
                else self.target
            )
            counts += f", {self.n_triggered} triggered (target {target})"
        if self.n_counterfactual:
            counts += f", {self.n_counterfactual} counterfactual"
        return "\n".join(lines) + f"\n\n{counts} inputs\n" + self._flag_rate_note()

    def _flag_rate_note(self) -> str:
        """The clean flag rate's 95% interval: one clean set is one draw, and a few hundred inputs cannot
        tell a detector calibrated to 0.5% from one at 1% (measured: 10-20% of 900-1,200-input test sets
        show over 0.5% from a true 0.28-0.36%, benchmarks/calibration_check.py)."""
        from .detector.calibrate import flag_rate_interval

        if self.patched.flag_rate_clean is None or not self.n_clean:
            return ""
        flagged = round(self.patched.flag_rate_clean * self.n_clean)
        low, high = flag_rate_interval(flagged, self.n_clean)
        text = (
            f"clean inputs flagged: {flagged} of {self.n_clean}, the true rate within {low:.2%}-{high:.2%} "
            f"(95% interval)\n"
        )
        return text + self._calibration_note(low)

    def _calibration_note(self, low: float) -> str:
        """Why clean inputs are flagged more often than calibration promised, when the interval says they are:
        thresholds hold for inputs like the calibration inputs only. Measured: a MiniLM detector calibrated to
        0.5% on reviews of a median 26 tokens flagged 5.1% of the same kind of reviews four to a row (102 tokens)."""
        c = self.calibration
        if c is None or low <= c.flag_rate:
            return ""
        text = (
            f"note: more clean inputs are flagged than the detector was calibrated for (at most {c.flag_rate:.2%}, "
            f"held with 90% confidence on inputs like its {c.inputs} calibration inputs)"
        )
        if c.length > 0 and self.clean_length > 1.5 * c.length:
            text += (
                f"; these have a median of {self.clean_length:.0f} tokens, its calibration inputs {c.length:.0f}: "
                "longer inputs have more columns to flag, and their attention differs"
            )
        return text + "; fit it again with --calibration inputs like the ones the model will see\n"

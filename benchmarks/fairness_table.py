"""The fairness benchmark's table and notes (benchmarks/fairness.py runs the case): one row per method
and metric, carrying every fairness figure, and the issue's targets said met or missed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import casekit
import numpy as np

MAX_ACCURACY_DROP = 0.3  # points: the clean-accuracy target, also handed to the fairness fit


@dataclass(frozen=True)
class FairnessRow(casekit.Row):
    """A table row that also carries the method's every fairness figure, whatever its metric."""

    flip_before: float | None = None  # counterfactual flip rate, original model
    flip_after: float | None = None
    gap_before: float | None = None  # demographic-parity gap
    gap_after: float | None = None
    gap_floor: float | None = None  # the original model's gap with the protected token masked out
    eo_before: float | None = None  # equalized-odds gap, where atpatch eval reports it
    eo_after: float | None = None
    eo_floor: float | None = None  # the original model's equalized-odds gap with the protected token masked out


METRICS = (("flip rate", "counterfactual_flip_rate"), ("parity gap", "parity_gap"))


def rows_of(
    results: dict, variants: list[str], model: Path, feeds: dict[str, np.ndarray], rounds: int
) -> list[FairnessRow]:
    """Two table rows per method (flip rate, parity gap). Kernel agreement on every test row; latency on a
    batch of 32 test rows the detector flags nothing in and one of 32 it flags (the second pass runs)."""
    rows = []
    b = results["baseline"]
    for name in [n for n in variants if n in results]:
        r = results[name]
        if isinstance(r, str):
            continue
        patched = Path(r.pop("patched_model"))
        agreement = casekit.native_vs_function(patched, feeds)
        # No trigger here: the flagged batch comes from the test rows themselves.
        speed = casekit.latency(model, patched, feeds, feeds, rounds)  # a 1 ms batch: many rounds against noise
        r["agreement"], r["latency"] = str(agreement), asdict(speed)
        o, p, pl = r["original"], r["patched"], r["per_layer"]["patched"]
        acc = (o["clean_accuracy"], p["clean_accuracy"])
        figures = figures_of(o, p, b["masked"])
        for metric, key in METRICS:
            extra = {"clean_flagged": p["flag_rate_clean"], "latency": speed, "agreement": str(agreement)}
            rows.append(
                FairnessRow(f"atpatch, {name}", metric, o[key], p[key], *acc, per_layer=pl[key], **extra, **figures)
            )
    acc = (b["original"]["clean_accuracy"], b["masked"]["clean_accuracy"])
    figures = figures_of(b["original"], b["masked"], b["masked"])
    for metric, key in METRICS:
        rows.append(
            FairnessRow(
                f"baseline: {results['attribute']} token masked",
                metric,
                b["original"][key],
                b["masked"][key],
                *acc,
                **figures,
            )  # fmt: skip
        )
    return rows


def figures_of(before: dict, after: dict, masked: dict) -> dict[str, float | None]:
    return {
        "flip_before": before["counterfactual_flip_rate"],
        "flip_after": after["counterfactual_flip_rate"],
        "gap_before": before["parity_gap"],
        "gap_after": after["parity_gap"],
        "gap_floor": masked["parity_gap"],
        "eo_before": before.get("equalized_odds_gap"),
        "eo_after": after.get("equalized_odds_gap"),
        "eo_floor": masked["equalized_odds_gap"],
    }


def setup_line(case: Any, results: dict) -> str:
    return (
        f"A 2-layer BERT (hidden 64, word-level tokens) trained from scratch on {case.setup} "
        f"({results['n_test']} rows) and their {case.attribute}-flipped counterfactual; {case.bias}. Debugging set: "
        f"{results['n_debug']} held-out rows misclassified only because of {case.attribute}; expected label = true "
        f"label. The fairness fit chooses its thresholds on {results['n_validation']} further held-out rows."
    )


def _reduction(before: float, after: float) -> float:
    return 1 - after / before if before > 0 else 0.0


def notes(case: Any, results: dict, variants: list[str], rows: list[FairnessRow]) -> list[str]:
    out = []
    tol = 1e-9  # figures that equal a target meet it, whatever the float rounding
    attr = case.attribute
    for name in [n for n in variants if n in results]:
        r = results[name]
        if isinstance(r, str):
            out.append(
                f"atpatch, {name}: {r}" if r.startswith("not run") else f"atpatch, {name}: `atpatch fit` failed: {r}"
            )
            continue
        row = next(x for x in rows if x.method == f"atpatch, {name}")
        flip = _reduction(row.flip_before, row.flip_after)
        excess = _reduction(row.gap_before - row.gap_floor, row.gap_after - row.gap_floor)
        drop = 100 * (row.cacc_before - row.cacc_after)
        flagged = row.clean_flagged or 0.0
        targets = [
            casekit.Target(
                f"flip rate {row.flip_before:.2%} → {row.flip_after:.2%}, reduced {flip:.0%}",
                flip >= 0.9 - tol,
                "≥ 90%",
            ),  # fmt: skip
            casekit.Target(f"clean accuracy {-drop:+.2f} pt", drop <= MAX_ACCURACY_DROP + tol, "a drop ≤ 0.3 pt"),
            casekit.Target(
                f"parity gap {row.gap_before:.2%} → {row.gap_after:.2%}, its distance above the {row.gap_floor:.2%} "
                f"floor reduced {excess:.0%}",
                excess >= 0.9 - tol,
                "≥ 90%",
            ),  # fmt: skip
            casekit.Target(f"clean flag rate {flagged:.2%}", flagged <= 0.005 + tol, "≤ 0.5%"),
        ]
        pl = r["per_layer"]["patched"]
        said = casekit.fit_summary(r.get("fit", ""))
        extra = ""
        if None not in (row.eo_before, row.eo_after, row.eo_floor):
            extra += f" Equalized-odds gap {row.eo_before:.2%} → {row.eo_after:.2%} (floor {row.eo_floor:.2%})."
        chosen = [c for c in r.get("tradeoff", {}).get("candidates", []) if c.get("chosen")]
        if chosen:
            c = chosen[0]
            extra += (
                f" Thresholds chosen on the validation rows: clean flag budget {c['name']} (validation: "
                f"{c['validation_flag_rate']:.2%} flagged, flip rate {c['counterfactual_flip_rate']:.2%}, "
                f"accuracy {c['accuracy']:.2%})."
            )
        if r.get("parity_gap_floor") is not None:
            extra += f" `atpatch eval --masked` (the token removed from the text): floor {r['parity_gap_floor']:.2%}."
        out.append(
            casekit.verdict(f"atpatch, {name}", targets)
            + f"; fit {r['fit_s']:.0f} s. Per layer (`--per-layer`): flip rate "
            f"{pl['counterfactual_flip_rate']:.2%}, parity gap {pl['parity_gap']:.2%}.{extra}"
            + (f" `atpatch fit` said: {said}" if said else "")
        )
    loc = results["localization"]
    out.append(
        f"`atpatch localize` on the {loc['rows']} debugging rows: removing some tokens restores the expected label "
        f"for {loc['restored']}; the culprit found is the {attr} token alone in {loc['protected_token_only']} and "
        f"includes it in {loc['protected_token']}. The rest are not restorable by removal (the model never saw a row "
        f"without {attr})."
    )
    out.append(
        f"Baseline: the {attr} token masked out of attention at inference (fairness through unawareness; needs the "
        "attribute's position, no retraining). Its flip rate is 0 by construction: the counterfactual differs "
        f"only in the masked token. Its parity gap is the floor (`gap_floor` in the results file): the gap a model "
        f"that cannot read {attr} still shows."
    )
    b = results["baseline"]
    flips, floor = b["original"]["counterfactual_flip_rate"], b["masked"]["parity_gap"]
    out.append(
        f"Why the targets conflict: {attr} decides {flips:.1%} of the clean test predictions, so undoing most "
        "of that means changing many clean inputs, while a 0.5% flag budget lets the detector touch 1 clean input "
        f"in 200; and the real test labels themselves differ by {results['label_gap']:.1%} between the groups, so "
        f"an accurate model that ignores {attr} still shows a parity gap of about {floor:.1%} (the masked "
        "baseline): the targets measure the gap above that floor."
    )
    out.append(
        f"No trigger in this case: floor and oracle do not apply (null in the results file); the {attr}-masked "
        "baseline plays the floor's part."
    )
    out.append(casekit.latency_note(rows, pool="test rows"))
    out.append(
        f"Flip rate: share of test rows whose prediction changes when the {attr} token is flipped. Parity gap: "
        f"|P({case.positive} | {case.group}) − P({case.positive} | {case.other})| over the test rows."
    )
    return out

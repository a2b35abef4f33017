"""benchmarks/latency.py's smoke run: the small models, batch 1, a few rounds, into a temp folder.

Its ratios mean little after three rounds; this checks that every variant runs (and that the
pass-through patch leaves outputs bit-identical, the flagging one changes them, which the script
asserts itself) and that latency.json has the cells the README's table and issue 16 name. The full
run is `python benchmarks/latency.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_runs import ROOT, published

pytest.importorskip("transformers")

RATIOS = (
    "native_vs_unpatched",
    "native_flag_vs_unpatched",
    "function_vs_unpatched",
    "function_flag_vs_unpatched",
    "native_expected_vs_unpatched",
    "fused_vs_unpatched",
    "fused_flag_vs_unpatched",
    "control",
)


def test_smoke_run_times_every_variant_of_the_small_models(tmp_path: Path) -> None:
    before = published("latency")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--smoke"]
    cmd += ["--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "models")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540)  # under the suite's 600 s per test
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "results" / "latency.json").read_text())
    cells = record["cells"]
    assert [(c["model"], c["seq"], c["batch"]) for c in cells] == [("vit-small", 50, 1), ("tabular-bert", 16, 1)]
    for cell in cells:
        for key in RATIOS:
            assert isinstance(cell[key], float) and cell[key] > 0, (key, cell[key])
        # Patching every layer's map in place: the kernel saw each map once and copied none.
        layers = {"vit-small": 4, "tabular-bert": 2}[cell["model"]]
        assert cell["in_place"]["native/pass"] == f"{layers}/{layers}"
    bert = cells[1]  # onnxruntime's BERT fusions apply to it, so the comparison with them is made
    assert bert["ort_optimized_vs_unpatched"] > 0 and bert["best_vs_ort_optimized"] > 0
    assert bert["fused_vs_ort_optimized"] > 0
    assert cells[0]["ort_optimized_vs_unpatched"] is None and cells[0]["fused_vs_ort_optimized"] is None
    assert len(record["verdicts"]) == 2 and all("target <= 1.05x" in v for v in record["verdicts"])
    assert published("latency") == before  # the smoke run wrote to its own folder


def test_op_profile_splits_the_op_from_the_model(tmp_path: Path) -> None:
    """benchmarks/op_profile.py on the tabular BERT: the kernel is one node; the function's inlined nodes,
    its branches' included, are counted as the op and not as the model."""
    out = tmp_path / "op_profile.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "op_profile.py"), "--model", "tabular-bert", "--seq", "16"]
    cmd += ["--runs", "3", "--label", "smoke", "--results", str(out), "--cache-dir", str(tmp_path / "models")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[W:" not in done.stderr, done.stderr  # no onnxruntime warning about the function's subgraphs
    record = json.loads(out.read_text())["tabular-bert/16x1"]["smoke"]
    native, function = record["native"], record["function"]
    assert list(native["op_nodes_ms"]) == ["AtPatch AtPatch"]
    nodes = function["op_nodes_ms"]
    assert "AtPatch AtPatch" not in nodes and "Identity pass_through" in nodes  # the clean input's copy
    assert any(name.startswith("ReduceMax peak/") for name in nodes)  # a node inside a branch
    assert sum(nodes.values()) == pytest.approx(function["groups_ms"]["op"])
    for form in (native, function):
        assert form["groups_ms"]["op"] > 0 and form["groups_ms"]["model"] > form["groups_ms"]["op"] / 100

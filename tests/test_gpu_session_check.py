"""scripts/gpu_session_check.py, the check of the op inside an onnxruntime-gpu CUDA session, run with the CPU
provider in the CUDA one's place: the wiring a GPU machine will run (scripts/gpu_selftest.sh), where one is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from atpatch.runtime import native

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_session_check.py"

pytest.importorskip("transformers")


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args, "--out", str(tmp_path), "--cache-dir", str(tmp_path / "models")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(native.library_path() is None, reason="the native kernel is not built")
def test_the_wiring_runs_every_check_with_the_cpu_provider(tmp_path: Path) -> None:
    done = _run("--device", "cpu", "--model", "tabular-bert", "--cells", "16x2", "--rounds", "3", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "gpu_session_check.json").read_text())
    assert record["passed"] and record["device"] == "cpu"
    assert {(r["dtype"], tuple(r["shape"])) for r in record["op"]} >= {("float32", (8, 12, 512, 512)),
                                                                      ("float16", (8, 12, 512, 512))}  # fmt: skip
    assert sum(r["flagged"] for r in record["op"]) > 0  # the patch itself ran, not only the features
    fused_op = [r for r in record["op"] if r["check"] == "fused op"]
    assert len(fused_op) == 3 and all(r["flags_equal"] and r["flagged"] > 0 for r in fused_op)
    variants = ("patched/pass", "patched/flag", "fused/pass", "fused/flag")
    assert [r["variant"] for r in record["model_agreement"]] == list(variants)
    (cell,) = record["latency"]
    assert cell["ort_fused_ms"] > 0
    assert {k for k in cell if k.endswith("_vs_ort_fused")} == {f"{k}_vs_ort_fused" for k in ("plain", *variants)}
    assert all(cell[f"{k}_vs_ort_fused"] > 0 for k in ("plain", *variants))


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_without_onnxruntime_gpu_it_says_what_to_install(tmp_path: Path) -> None:
    done = _run("--model", "tabular-bert", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "install onnxruntime-gpu" in done.stdout and "Traceback" not in done.stderr

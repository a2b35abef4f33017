"""A patched model runs in Node.js (onnxruntime-node, the op's ONNX function) and equals Python's onnxruntime."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from evalkit_models import random_text_inputs, saved_patched_pair

from atpatch.ops import spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed; the Node.js example cannot run")

# Same op graph in two builds of onnxruntime (1.30 in Node, Python's own): float32 rounding only.
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random BERT, plain and patched with a detector that flags high-mass columns."""
    return saved_patched_pair(tmp_path_factory.mktemp("node"))


def _run_node(model: Path, inputs: dict[str, np.ndarray], work: Path) -> dict[str, np.ndarray]:
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        pytest.fail(f"onnxruntime-node is not installed in {EXAMPLE}: run scripts/install.sh (it runs npm ci there)")
    specs = {k: {"type": str(v.dtype), "dims": list(v.shape), "data": v.ravel().tolist()} for k, v in inputs.items()}
    (work / "inputs.json").write_text(json.dumps(specs))
    result = subprocess.run(
        [NODE, str(EXAMPLE / "run.js"), str(model), str(work / "inputs.json"), str(work / "outputs.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "onnxruntime-node 1.30.0" in result.stdout
    outputs = json.loads((work / "outputs.json").read_text())
    return {k: np.array(v["data"], dtype=v["type"]).reshape(v["dims"]) for k, v in outputs.items()}


def _python(model: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    # No library registered: onnxruntime inlines the model-local function, as Node does.
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def test_patched_model_in_node_equals_python_onnxruntime(
    models: dict[str, Path], rng: np.random.Generator, tmp_path: Path
) -> None:
    patched = onnx.load(str(models["patched"]))
    assert sum(n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE for n in patched.graph.node) == 2
    assert any(f.domain == spec.DOMAIN and f.name == spec.OP_TYPE for f in patched.functions)

    inputs = random_text_inputs(models["hf"], rng)
    node = _run_node(models["patched"], inputs, tmp_path)
    python = _python(models["patched"], inputs)

    assert list(node) == ["logits"]
    assert node["logits"].dtype == np.float32 and node["logits"].shape == python.shape == (3, 2)
    np.testing.assert_allclose(node["logits"], python, rtol=RTOL, atol=ATOL)
    # The detector flags columns on these inputs, so the equality above covers the patch itself.
    plain = _python(models["plain"], inputs)
    assert np.abs(plain - python).max() > 100 * ATOL


def test_unpatched_model_in_node_equals_python_onnxruntime(
    models: dict[str, Path], rng: np.random.Generator, tmp_path: Path
) -> None:
    """The control: Node's onnxruntime agrees with Python's on the plain model too."""
    inputs = random_text_inputs(models["hf"], rng, batch=2, seq=7)
    node = _run_node(models["plain"], inputs, tmp_path)
    np.testing.assert_allclose(node["logits"], _python(models["plain"], inputs), rtol=RTOL, atol=ATOL)

"""A weight's aliases are resolved before cross-layer patching's pass 2 reads it (rewrite/weight_aliases.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from atpatch.rewrite import patch_model
from atpatch.rewrite.weight_aliases import resolve_weight_aliases


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    """y = ((x + a) + alias_of_a) + (equal_to_b + b) + fed, with `fed` an initializer a caller may override."""
    a, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Identity", ["a"], ["alias_of_a"]),
        helper.make_node("Add", ["x", "a"], ["s1"]),
        helper.make_node("Add", ["s1", "alias_of_a"], ["s2"]),
        helper.make_node("Add", ["equal_to_b", "b"], ["s3"]),
        helper.make_node("Add", ["s2", "s3"], ["s4"]),
        helper.make_node("Add", ["s4", "fed"], ["y"]),
    ]
    weights = [
        numpy_helper.from_array(a, "a"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(b.copy(), "equal_to_b"),
        numpy_helper.from_array(b.copy(), "fed"),
    ]
    inputs = [helper.make_tensor_value_info("x", f, [4]), helper.make_tensor_value_info("fed", f, [4])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", f, [4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_aliases_and_equal_weights_go_and_fed_initializers_stay(rng: np.random.Generator) -> None:
    model = _graph(rng)
    resolved = onnx.ModelProto()
    resolved.CopyFrom(model)
    assert resolve_weight_aliases(resolved.graph) == 2
    onnx.checker.check_model(resolved)
    assert [n.op_type for n in resolved.graph.node] == ["Add"] * 5
    assert sorted(t.name for t in resolved.graph.initializer) == ["a", "b", "fed"]  # `fed` equals `b`: kept
    assert [list(n.input) for n in resolved.graph.node][:3] == [["x", "a"], ["s1", "a"], ["b", "b"]]
    x = rng.standard_normal(4).astype(np.float32)
    fed = rng.standard_normal(4).astype(np.float32)
    for feeds in ({"x": x}, {"x": x, "fed": fed}):
        np.testing.assert_array_equal(_run(resolved, feeds), _run(model, feeds))


def test_a_cross_layer_patched_export_starts_without_onnxruntime_warnings(exported, tmp_path: Path) -> None:  # noqa: ANN001
    """The tiny random BERT, exported by torch (which names its equal zero biases and unit norm weights with
    Identity nodes): onnxruntime warned once per such weight read by pass 2 at every session start."""
    pytest.importorskip("transformers")
    result = exported("bert", False, 17)
    assert any(
        n.op_type == "Identity" and n.input[0] in {t.name for t in result.model.graph.initializer}
        for n in result.model.graph.node
    )  # fmt: skip - the aliases this is about
    patched, _ = patch_model(result.model, None)
    path = tmp_path / "patched.onnx"
    onnx.save(patched, str(path))
    # A new process: onnxruntime logs from C++ to the process's stderr, once per session start.
    script = f"import onnxruntime as ort; ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[W:onnxruntime" not in done.stderr, done.stderr[:2000]

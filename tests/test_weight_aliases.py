"""Cross-layer patching's pass 2 reads weights by their own names, not through pass 1's Identity aliases
(rewrite/weight_aliases.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from atpatch.rewrite import patch_model
from atpatch.rewrite.weight_aliases import weight_aliases


def test_aliases_map_to_the_weight_through_chains_and_never_to_a_fed_initializer(rng: np.random.Generator) -> None:
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Identity", ["w"], ["alias"]),
        helper.make_node("Identity", ["alias"], ["alias_of_alias"]),
        helper.make_node("Identity", ["fed"], ["alias_of_fed"]),  # a caller may feed `fed`: not a fixed weight
        helper.make_node("Identity", ["x"], ["not_a_weight"]),
        helper.make_node("Sum", ["x", "alias_of_alias", "alias_of_fed", "not_a_weight"], ["y"]),
    ]
    weights = [numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), name) for name in ("w", "fed")]
    inputs = [helper.make_tensor_value_info(name, f, [3]) for name in ("x", "fed")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", f, [3])], weights)
    assert weight_aliases(graph) == {"alias": "w", "alias_of_alias": "w"}


def test_a_cross_layer_patched_export_starts_without_onnxruntime_warnings(exported, tmp_path: Path) -> None:  # noqa: ANN001
    """The tiny random BERT, exported by torch (which names its equal zero biases and unit norm weights with
    Identity nodes): onnxruntime warned once per such weight read by pass 2 at every session start."""
    pytest.importorskip("transformers")
    result = exported("bert", False, 17)
    aliases = set(weight_aliases(result.model.graph))
    assert aliases  # the export names some weights through Identity nodes: what this is about
    patched, _ = patch_model(result.model, None)
    assert aliases <= {o for n in patched.graph.node for o in n.output}  # pass 1 keeps the user's nodes
    path = tmp_path / "patched.onnx"
    onnx.save(patched, str(path))
    # A new process: onnxruntime logs from C++ to the process's stderr, once per session start.
    script = f"import onnxruntime as ort; ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[W:onnxruntime" not in done.stderr, done.stderr[:2000]

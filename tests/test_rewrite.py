"""Which softmaxes the rewrite patches, which it refuses, and why it says so."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from atpatch.detector import Detector
from atpatch.detector.probe import read_detector
from atpatch.errors import (
    AlreadyPatchedError,
    DetectorMismatchError,
    FusedAttentionError,
    InvalidModelError,
    NoAttentionError,
)
from atpatch.ops import spec
from atpatch.rewrite import find_attention_sites, patch_model


def test_only_the_attention_softmax_is_patched_not_the_classifier() -> None:
    patched, sites = patch_model(graphs.attention_and_classifier())
    assert [s.tap for s in sites] == ["probs"]
    (node,) = [n for n in patched.graph.node if n.op_type == spec.OP_TYPE]
    assert node.input[0] == "probs"
    consumers = [n for n in patched.graph.node if "probs" in n.input]
    assert consumers == [node], "P.V must now read the patched map"
    classifier = next(n for n in patched.graph.node if n.op_type == "Softmax" and n.input[0] == "cls")
    assert classifier.output[0] == "p"
    onnx.checker.check_model(patched, full_check=True)


def test_patched_graph_runs_and_a_passthrough_patch_changes_nothing(rng: np.random.Generator) -> None:
    original = graphs.attention_and_classifier()
    patched, _ = patch_model(original)
    feeds = {n: rng.normal(size=(2, 3, 5, 4)).astype(np.float32) for n in ("q", "k", "v")}
    feeds["cls"] = rng.normal(size=(2, 6)).astype(np.float32)

    def run(model: onnx.ModelProto) -> list[np.ndarray]:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    for a, b in zip(run(original), run(patched), strict=True):
        assert np.array_equal(a, b)


def test_a_graph_without_attention_is_refused_with_each_softmax_explained() -> None:
    with pytest.raises(NoAttentionError) as err:
        patch_model(graphs.decoys_only())
    message = str(err.value)
    assert "rank 2" in message and "over axis 1" in message and "Q.K^T" in message
    assert "eager" in message  # names the fix


@pytest.mark.parametrize(
    ("model", "op"),
    [
        (graphs.group_query_attention_op, "com.microsoft::GroupQueryAttention"),
        (graphs.ms_attention_op, "com.microsoft::Attention"),
    ],
)
def test_fused_attention_that_cannot_be_decomposed_is_refused_naming_the_op(model, op: str) -> None:  # noqa: ANN001
    with pytest.raises(FusedAttentionError, match=op) as err:
        patch_model(model())
    assert "attn_implementation='eager'" in str(err.value)


def test_a_patched_model_is_not_patched_twice() -> None:
    patched, _ = patch_model(graphs.attention_and_classifier())
    with pytest.raises(AlreadyPatchedError, match="already patched"):
        patch_model(patched)


def test_a_detector_for_a_different_number_of_layers_is_refused() -> None:
    with pytest.raises(DetectorMismatchError, match="1 attention layers"):
        patch_model(graphs.attention_and_classifier(), Detector.pass_through([2] * 3))


def test_a_detector_for_another_head_count_is_refused() -> None:
    with pytest.raises(DetectorMismatchError, match="layer 0 is for 2 heads, the model's has 3"):
        patch_model(graphs.attention_and_classifier(), Detector.pass_through([2]))


def test_a_pass_through_patch_reads_head_counts_the_graph_does_not_show(rng: np.random.Generator) -> None:
    model = graphs.attention_and_classifier()
    for value in (*model.graph.input[:3], model.graph.output[0]):
        value.type.tensor_type.shape.dim[1].dim_param = "H"  # heads symbolic, as in some exports
    assert find_attention_sites(model)[0].heads is None
    patched, _ = patch_model(model)
    detector = read_detector(patched)
    assert detector.heads == [2]  # the probe run's symbolic dims are 2


def test_a_detector_fitted_for_another_model_is_refused() -> None:
    sites = find_attention_sites(graphs.attention_and_classifier())
    other = Detector.pass_through([s.heads for s in sites])
    stamped = Detector(layers=other.layers, kind="fitted", model_fingerprint="0123456789abcdef")
    with pytest.raises(DetectorMismatchError, match="fitted for model 0123456789abcdef"):
        patch_model(graphs.attention_and_classifier(), stamped)


def test_opsets_below_the_function_minimum_are_refused_with_the_fix() -> None:
    old = graphs.parse(
        """
    g (float[B,H,S,D] q, float[B,H,S,D] k) => (float[B,H,S,S] y) {
        kt = Transpose<perm=[0,1,3,2]>(k)
        y = MatMul(q, kt)
    }""",
        '<ir_version: 7, opset_import: ["" : 13]>',
    )
    with pytest.raises(InvalidModelError, match="re-export at opset 17 or 18"):
        patch_model(old)

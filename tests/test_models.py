"""Tiny random BERT, DistilBERT, RoBERTa, ALBERT, DeBERTa-v2, ViT and GPT-2: exported both ways, patched, run in
onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MORE_ENCODERS
from torch_reference import assert_matches_torch, cross_layer_forward, forward, patched_softmax

from atpatch.detector import Detector
from atpatch.errors import AtPatchError
from atpatch.ops import reference, spec
from atpatch.rewrite import patch_model

pytest.importorskip("transformers")

CASES = [
    (arch, dynamo, opset)
    for arch in ("bert", "vit", "gpt2")
    for dynamo in (False, True)
    for opset in (17, 18)
    if not (arch == "gpt2" and dynamo and opset == 17)  # see test below
] + [(arch, dynamo, 17) for arch in ("distilbert", "roberta", "albert", "deberta-v2") for dynamo in (False, True)]
# The other encoders the export recipes claim, on the default path.
CASES += [(arch, False, 17) for arch in MORE_ENCODERS if (arch, True, 17) not in CASES]
IDS = [f"{a}-{'dynamo' if d else 'legacy'}-opset{o}" for a, d, o in CASES]
NUM_LAYERS = 2


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs(result, rng: np.random.Generator, batch: int = 3, seq: int = 10) -> dict[str, np.ndarray]:  # noqa: ANN001
    return result.family.make_inputs(result.config, batch, seq, rng)


def _attention_probs_tensor(model: onnx.ModelProto, name: str) -> bool:
    """True when `name` is a Softmax output, or the exporter's NaN guard of one."""
    producer = {out: n for n in model.graph.node for out in n.output}
    node = producer[name]
    if node.op_type == "Where":
        node = producer[node.input[2]]
    return node.op_type == "Softmax"


@pytest.mark.parametrize(("arch", "dynamo", "opset"), CASES, ids=IDS)
def test_one_patch_per_attention_layer_and_passthrough_outputs_are_identical(
    exported,
    arch: str,
    dynamo: bool,
    opset: int,
    rng: np.random.Generator,  # noqa: ANN001
) -> None:
    result = exported(arch, dynamo, opset)
    patched, sites = patch_model(result.model)
    onnx.checker.check_model(patched, full_check=True)

    patches = [n for n in patched.graph.node if n.op_type == spec.OP_TYPE]
    assert len(patches) == len(sites) == NUM_LAYERS
    assert all(n.domain == spec.DOMAIN and _attention_probs_tensor(patched, n.input[0]) for n in patches)
    softmaxes = [n for n in patched.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == NUM_LAYERS  # nothing else was touched or added
    assert sum(n.op_type == spec.OP_TYPE for n in result.model.graph.node) == 0  # input not modified

    inputs = _inputs(result, rng)
    (before,) = _session(result.model).run(None, inputs)
    (after,) = _session(patched).run(None, inputs)
    assert np.array_equal(before, after)


def _flagging_detector(model, inputs: dict[str, np.ndarray], kwargs: dict) -> Detector:  # noqa: ANN001
    """Per layer, a threshold in a wide gap of that layer's scores (under the earlier layers' patches)."""
    heads = model.config.num_attention_heads
    w1 = np.zeros((spec.num_features(heads), 1), np.float32)
    w1[:heads, 0] = 1.0  # score = the column's attention mass summed over heads
    never = reference.LayerDetector(w1, np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.float32), 1e30)
    layers = [never] * NUM_LAYERS
    for i in range(NUM_LAYERS):
        seen: list[np.ndarray] = []
        with patched_softmax(layers, seen):
            forward(model, inputs, **kwargs)
        scores = np.sort(np.unique(reference.column_scores(seen[i], layers[i])))[::-1]
        top = scores[: max(2, len(scores) // 4)]
        gaps = top[:-1] - top[1:]
        j = int(np.argmax(gaps))
        assert gaps[j] > 1e-3, "no clear gap to put a threshold in"
        layers[i] = reference.LayerDetector(w1, never.b1, never.w2, never.b2, float((top[j] + top[j + 1]) / 2))
    return Detector(layers=tuple(layers), kind="test-flagging")


@pytest.mark.parametrize(("arch", "dynamo", "opset"), CASES, ids=IDS)
def test_flagged_columns_give_the_same_outputs_as_pytorch_patched_by_the_reference(
    exported,
    arch: str,
    dynamo: bool,
    opset: int,
    rng: np.random.Generator,  # noqa: ANN001
) -> None:
    """Cross-layer (the default) and per-layer patching both equal PyTorch patched by the reference."""
    from atpatch.exporter.hf import load_hf_model

    result = exported(arch, dynamo, opset)
    model = load_hf_model(result.folder)
    inputs = _inputs(result, rng, batch=3, seq=12)  # includes a padded row; GPT-2 is causal
    kwargs = result.family.forward_kwargs
    detector = _flagging_detector(model, inputs, kwargs)
    (unpatched,) = _session(result.model).run(None, inputs)

    patched, _ = patch_model(result.model, detector)
    expected, union = cross_layer_forward(model, inputs, detector.layers, **kwargs)
    (got,) = _session(patched).run(None, inputs)
    assert np.abs(got - unpatched).max() > 1e-4, "the flagging detector should change the outputs"
    assert_matches_torch(got, expected)
    for row in np.flatnonzero(~union.any(axis=1)):
        assert np.array_equal(got[row], unpatched[row]), "an input with nothing flagged keeps its outputs"

    per_layer, _ = patch_model(result.model, detector, cross_layer=False)
    with patched_softmax(detector.layers):
        expected = forward(model, inputs, **kwargs)
    assert_matches_torch(_session(per_layer).run(None, inputs)[0], expected)


def test_dynamo_gpt2_at_opset_17_is_refused_with_the_working_setting(hf_folder) -> None:  # noqa: ANN001
    from atpatch.exporter import export_hf

    with pytest.raises(AtPatchError, match="--opset 18"):
        export_hf(hf_folder("gpt2"), opset=17, dynamo=True)


def test_export_past_tolerance_raises_a_typed_error_naming_the_output(hf_folder, monkeypatch) -> None:  # noqa: ANN001
    import dataclasses

    from atpatch.errors import ExportValidationError
    from atpatch.exporter import hf
    from atpatch.exporter.families import family_for

    strict = dataclasses.replace(family_for("bert"), atol=-1.0)  # no difference can pass
    monkeypatch.setattr(hf, "family_for", lambda _: strict)
    with pytest.raises(ExportValidationError, match="ONNX output 'logits' differs from PyTorch by"):
        hf.export_hf(hf_folder("bert"))


def test_export_command_from_a_hf_folder_validates_and_patches(hf_folder, tmp_path, capsys) -> None:  # noqa: ANN001
    from atpatch.cli import export_main

    out = tmp_path / "vit.patched.onnx"
    assert export_main(["--hf", str(hf_folder("vit")), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "validated: logits max |ONNX - PyTorch|" in text and "patched 2 attention layers (4 heads)" in text
    patched = onnx.load(str(out))
    onnx.checker.check_model(patched, full_check=True)
    assert sum(n.op_type == spec.OP_TYPE for n in patched.graph.node) == NUM_LAYERS

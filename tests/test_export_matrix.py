"""Encoders through every export path: {BERT, ViT} x {TorchScript, dynamo} x {eager, SDPA} x {opset 17, 18, 23}.

test_models.py covers eager attention at opsets 17/18 with both exporters; this file covers the
rest of the matrix with the same checks (one AtPatch per layer, pass-through outputs equal the
original's, flagged outputs equal PyTorch patched by the numpy reference), plus graphs fused the way
optimum's exporter fuses them (optimum-onnx needs transformers < 4.58, so it does not install next
to transformers 5 here): onnxruntime.transformers' optimize_model and onnxscript's optimize_for_ort,
both of which hide the softmax in com.microsoft::Attention. dynamo + SDPA at opset 23 emits ONNX
Attention. Fused graphs are decomposed before patching, so their pass-through outputs equal the
fused original to float rounding (atol 1e-5), not bit for bit.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_models import CASES as EAGER_CASES
from test_models import NUM_LAYERS, _attention_probs_tensor, _flagging_detector, _session
from torch_reference import assert_matches_torch, cross_layer_forward

from atpatch.ops import spec
from atpatch.rewrite import patch_model

pytest.importorskip("transformers")

ARCHS, EXPORTERS, ATTENTIONS, OPSETS = ("bert", "vit"), (False, True), ("eager", "sdpa"), (17, 18, 23)
CASES = [
    (arch, dynamo, attention, opset)
    for arch, dynamo, attention, opset in itertools.product(ARCHS, EXPORTERS, ATTENTIONS, OPSETS)
    if (arch, dynamo, opset) not in EAGER_CASES or attention != "eager"
]
# Graphs fused into com.microsoft::Attention the way optimum's exporter fuses them.
FUSERS = {
    "ort-optimizer": ("bert", False, 17),  # TorchScript BERT: 1D mask index from EmbedLayerNormalization
    "onnxscript-ort-fusions": ("bert", True, 18),  # dynamo: additive attention_bias, qkv_hidden_sizes
    "onnxscript-ort-fusions-vit": ("vit", True, 18),
}
FUSED_OPS = {("", "Attention"), ("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention")}


def _ids(case: tuple) -> str:
    arch, dynamo, attention, opset = case
    return f"{arch}-{'dynamo' if dynamo else 'legacy'}-{attention}-opset{opset}"


def test_this_file_and_test_models_together_cover_the_whole_matrix() -> None:
    covered = {(a, d, "eager", o) for a, d, o in EAGER_CASES} | set(CASES)
    assert covered >= set(itertools.product(ARCHS, EXPORTERS, ATTENTIONS, OPSETS))


@pytest.fixture(scope="session")
def exported_as(hf_folder: Callable[[str], Path], exported: Callable) -> Callable:  # type: ignore[type-arg]
    """(arch, dynamo, attention, opset) -> ExportResult; eager 17/18 shares test_models' exports."""
    from atpatch.exporter import export_hf

    cache: dict[tuple, object] = {}

    def get(arch: str, dynamo: bool, attention: str, opset: int):  # noqa: ANN202
        if attention == "eager" and (arch, dynamo, opset) in EAGER_CASES:
            return exported(arch, dynamo, opset)
        key = (arch, dynamo, attention, opset)
        if key not in cache:
            cache[key] = export_hf(hf_folder(arch), opset=opset, dynamo=dynamo, attention=attention)
        return cache[key]

    return get


def _fuse(result, fuser: str):  # noqa: ANN001, ANN202
    """The export with its attention fused into com.microsoft::Attention."""
    if fuser == "ort-optimizer":
        from onnxruntime.transformers.optimizer import optimize_model

        config = result.config
        original = onnx.ModelProto()
        original.CopyFrom(result.model)  # optimize_model rewrites the model it is given: keep the shared export
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = optimize_model(
                original,
                model_type="bert",
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
                opt_level=0,
            )
        model = fused.model
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            # optimize_model adds this import only when saving to a file.
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    else:
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        fused_ir, _ = optimize_for_ort(ir.from_proto(result.model))
        model = ir.to_proto(fused_ir)
    return replace(result, model=model)


def _fused_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if ("" if n.domain == "ai.onnx" else n.domain, n.op_type) in FUSED_OPS]


def _check_patched_and_passthrough(result, rng: np.random.Generator) -> list[str]:  # noqa: ANN001
    """Patch with a pass-through; check one AtPatch per layer on an attention map and unchanged outputs."""
    fused = _fused_ops(result.model)
    patched, sites = patch_model(result.model)
    onnx.checker.check_model(patched, full_check=True)
    patches = [n for n in patched.graph.node if n.op_type == spec.OP_TYPE]
    assert len(patches) == len(sites) == NUM_LAYERS
    assert all(n.domain == spec.DOMAIN and _attention_probs_tensor(patched, n.input[0]) for n in patches)
    assert not _fused_ops(patched)
    assert sum(n.op_type == "Softmax" for n in patched.graph.node) == NUM_LAYERS
    assert {s.heads for s in sites} == {result.config.num_attention_heads}
    if fused:
        assert all(s.notes[-1].startswith("decomposed from ") for s in sites)

    inputs = result.family.make_inputs(result.config, 3, 10, rng)
    inputs = {k: v for k, v in inputs.items() if k in {i.name for i in result.model.graph.input}}
    (before,) = _session(result.model).run(None, inputs)
    (after,) = _session(patched).run(None, inputs)
    if fused:
        np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    else:
        assert np.array_equal(before, after)
    return fused


def _check_flagged_matches_pytorch(result, rng: np.random.Generator) -> None:  # noqa: ANN001
    from atpatch.exporter.hf import load_hf_model

    model = load_hf_model(result.folder)  # eager: the reference patches its softmax
    inputs = result.family.make_inputs(result.config, 3, 12, rng)  # includes a right-padded row
    kwargs = result.family.forward_kwargs
    detector = _flagging_detector(model, inputs, kwargs)
    patched, _ = patch_model(result.model, detector)
    expected, _ = cross_layer_forward(model, inputs, detector.layers, **kwargs)
    feeds = {k: v for k, v in inputs.items() if k in {i.name for i in result.model.graph.input}}
    (got,) = _session(patched).run(None, feeds)
    (unpatched,) = _session(result.model).run(None, feeds)
    assert np.abs(got - unpatched).max() > 1e-4, "the flagging detector should change the outputs"
    assert_matches_torch(got, expected)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_every_export_path_is_patched_per_layer_and_passes_through_unchanged(
    exported_as,
    case: tuple,
    rng: np.random.Generator,  # noqa: ANN001
) -> None:
    arch, dynamo, attention, opset = case
    fused = _check_patched_and_passthrough(exported_as(*case), rng)
    # What each path emits, measured: only dynamo + SDPA at opset 23 hides the softmax in ONNX Attention.
    assert fused == (["Attention"] * NUM_LAYERS if dynamo and attention == "sdpa" and opset == 23 else [])


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_every_export_path_flagged_gives_pytorch_patched_by_the_reference(
    exported_as,
    case: tuple,
    rng: np.random.Generator,  # noqa: ANN001
) -> None:
    _check_flagged_matches_pytorch(exported_as(*case), rng)


@pytest.mark.parametrize("fuser", list(FUSERS))
def test_graphs_fused_like_optimum_are_decomposed_patched_and_match_pytorch(
    exported_as,
    fuser: str,
    rng: np.random.Generator,  # noqa: ANN001
) -> None:
    arch, dynamo, opset = FUSERS[fuser]
    result = _fuse(exported_as(arch, dynamo, "eager", opset), fuser)
    fused = _check_patched_and_passthrough(result, rng)
    assert fused == ["Attention"] * NUM_LAYERS, "the fuser should hide every layer's softmax"
    _check_flagged_matches_pytorch(result, rng)


def test_export_command_takes_the_attention_implementation(hf_folder, tmp_path, capsys) -> None:  # noqa: ANN001
    from atpatch.cli import export_main

    out = tmp_path / "bert-sdpa.patched.onnx"
    assert export_main(["--hf", str(hf_folder("bert")), "--attention", "sdpa", "-o", str(out)]) == 0
    assert "patched 2 attention layers (4 heads)" in capsys.readouterr().out
    patched = onnx.load(str(out))
    assert sum(n.op_type == "IsNaN" for n in patched.graph.node) == NUM_LAYERS  # SDPA's NaN guard: not eager
    assert sum(n.op_type == spec.OP_TYPE for n in patched.graph.node) == NUM_LAYERS

    plain = tmp_path / "plain.onnx"
    onnx.save(patched, str(plain))
    assert export_main([str(plain), "--attention", "sdpa", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "--attention apply to --hf exports only" in capsys.readouterr().err

"""Attention forms found beyond onnx's own suite (tests/test_attention_conformance.py): what real
exporters write around attention, patched or refused by name.

Small graphs written inline; each patched one is run through onnxruntime and compared with the
original (a pass-through patch changes nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from atpatch.modelio import load_model, save_model
from atpatch.rewrite import find_attention_sites, patch_model


def _parse(text: str, opsets: str = '"" : 17') -> onnx.ModelProto:
    return onnx.parser.parse_model(f"<ir_version: 9, opset_import: [{opsets}]>\n{text}")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _attention_after_rms_norm() -> onnx.ModelProto:
    """onnxruntime-genai's form: SimplifiedLayerNormalization (an onnxruntime contrib op registered in
    the ai.onnx domain, unknown to onnx) before a 2-head attention block."""
    return _parse("""
    g (float[1,4,8] x, float[8] gamma) => (float[1,2,4,4] y) {
        h = SimplifiedLayerNormalization<axis=-1, epsilon=0.00001>(x, gamma)
        shape = Constant<value=int64[4] {1, 4, 2, 4}>()
        heads = Reshape(h, shape)
        q = Transpose<perm=[0,2,1,3]>(heads)
        kt = Transpose<perm=[0,2,3,1]>(heads)
        scores = MatMul(q, kt)
        probs = Softmax<axis=-1>(scores)
        y = MatMul(probs, q)
    }""")


def test_onnxruntime_contrib_ops_in_the_onnx_domain_are_accepted(tmp_path: Path) -> None:
    model = _attention_after_rms_norm()
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(model)  # what atpatch used to repeat as "not a valid ONNX model"
    path = tmp_path / "genai.onnx"
    onnx.save_model(model, str(path))
    loaded = load_model(path)
    patched, sites = patch_model(loaded)
    assert len(sites) == 1 and sites[0].heads == 2
    save_model(patched, tmp_path / "patched.onnx", check=True)
    feeds = {
        "x": np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32),
        "gamma": np.ones(8, np.float32),
    }
    np.testing.assert_array_equal(_run(patched, feeds)[0], _run(model, feeds)[0])


def test_an_op_neither_onnx_nor_onnxruntime_knows_is_still_invalid(tmp_path: Path) -> None:
    text = onnx.printer.to_text(_attention_after_rms_norm()).replace("SimplifiedLayerNormalization", "NoSuchNorm")
    path = tmp_path / "bad.onnx"
    onnx.save_model(onnx.parser.parse_model(text), str(path))
    from atpatch.errors import InvalidModelError

    with pytest.raises(InvalidModelError, match=r"not a valid ONNX model \(No Op registered for NoSuchNorm"):
        load_model(path)


def test_find_sites_sees_through_onnxruntime_contrib_ops() -> None:
    assert [s.heads for s in find_attention_sites(_attention_after_rms_norm())] == [2]


def _mha_after_skip_layer_norm(width: int = 8) -> onnx.ModelProto:
    """onnxruntime's fuser with use_multi_head_attention=True: MultiHeadAttention on 3D Q/K/V made by
    MatMuls after a contrib op (SkipLayerNormalization), no value_info, so onnx infers no rank for them."""
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal((width, width)).astype(np.float32) / width**0.5 for n in ("wq", "wk", "wv")}
    weights |= {"gamma": np.ones(width, np.float32), "beta": np.zeros(width, np.float32)}
    model = _parse(
        f"""
    g (float[B,S,{width}] x, float[B,S,{width}] skip) => (float[B,S,{width}] y) {{
        h = com.microsoft.SkipLayerNormalization<epsilon=0.00001>(x, skip, gamma, beta)
        q = MatMul(h, wq)
        k = MatMul(h, wk)
        v = MatMul(h, wv)
        y = com.microsoft.MultiHeadAttention<num_heads=2>(q, k, v)
    }}""",
        '"" : 17, "com.microsoft" : 1',
    )
    model.graph.initializer.extend(onnx.numpy_helper.from_array(w, n) for n, w in weights.items())
    return model


@pytest.mark.parametrize("width", [8, 160], ids=["small", "weights-past-64KiB"])  # large ones are not copied
def test_multihead_attention_without_shape_info_is_patched_after_symbolic_inference(width: int) -> None:
    model = _mha_after_skip_layer_norm(width)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    assert "q" not in {v.name for v in inferred.graph.value_info}  # what used to be refused
    patched, sites = patch_model(model)
    assert len(sites) == 1 and sites[0].heads == 2
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 5, width)).astype(np.float32) for n in ("x", "skip")}
    np.testing.assert_allclose(_run(patched, feeds)[0], _run(model, feeds)[0], atol=1e-5, rtol=0)


def test_multihead_attention_of_unknown_ranks_is_refused_naming_shape_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from atpatch.errors import FusedAttentionError
    from atpatch.rewrite import shapes

    monkeypatch.setattr(shapes, "_symbolic", lambda model: None)  # as if onnxruntime's inference failed
    with pytest.raises(FusedAttentionError, match=r"unknown ranks \(\?, \?, \?\).*symbolic_shape_infer"):
        patch_model(_mha_after_skip_layer_norm())


def test_shape_inference_writes_no_file_where_onnxruntimes_is_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gqa_graphs import GqaCase

    from atpatch.rewrite.shapes import infer_shapes

    # GroupQueryAttention without a cache: onnxruntime's symbolic inference stops short on it, and its own
    # entry point then saves sym_shape_infer_temp.onnx (and a .data file) in the current folder.
    monkeypatch.chdir(tmp_path)
    infer_shapes(GqaCase(cache="none").model())
    assert list(tmp_path.iterdir()) == []


def test_onnxruntimes_multihead_attention_fusion_of_bert_is_patched_bit_identically(exported, rng) -> None:  # noqa: ANN001
    """The fuser's real output (use_multi_head_attention=True) has no value_info at all."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    result = exported("bert", False, 17)
    options = FusionOptions("bert")
    options.use_multi_head_attention = True
    copy = onnx.ModelProto()
    copy.CopyFrom(result.model)
    fused = optimize_model(
        copy, model_type="bert", num_heads=4, hidden_size=32, optimization_options=options, opt_level=0
    ).model
    assert sum(n.op_type == "MultiHeadAttention" for n in fused.graph.node) == 2 and not fused.graph.value_info
    patched, sites = patch_model(fused)
    assert [s.notes[-1] for s in sites] == ["decomposed from com.microsoft::MultiHeadAttention"] * 2
    inputs = result.family.make_inputs(result.config, 3, 10, rng)
    np.testing.assert_array_equal(_run(patched, inputs)[0], _run(fused, inputs)[0])

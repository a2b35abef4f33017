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

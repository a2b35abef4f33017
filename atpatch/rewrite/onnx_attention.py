"""ONNX `Attention` (opset 23+) -> explicit attention, as onnxruntime's CPU kernel computes it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from .explicit import (
    _REEXPORT,
    Decomposed,
    _add,
    _attend,
    _attrs,
    _causal,
    _check_only,
    _Core,
    _Graph,
    _input,
    _Mask,
    _Nodes,
    _output,
    _refuse,
    _run_pass,
    _with_past,
)

__all__ = ["decompose_onnx_attention"]


def _onnx_attention(b: _Nodes, g: _Graph, node: onnx.NodeProto) -> str:
    attrs = _attrs(node)
    _check_only(node, (0, 1, 2, 3, 4, 5), (0, 1, 2, 3), _REEXPORT)
    if attrs.get("left_window_size", -1) != -1 or attrs.get("right_window_size", -1) != -1:
        raise _refuse(node, "a sliding window", _REEXPORT)
    mode = int(attrs.get("qk_matmul_output_mode", 0))
    if _output(node, 3) and mode != 3:
        raise _refuse(node, f"qk_matmul_output_mode {mode} with its output read", _REEXPORT)
    q, k, v, mask, past_k, past_v = (_input(node, i) for i in range(6))
    three_d = g.rank(q) == 3 or (g.rank(q) is None and "q_num_heads" in attrs)
    hq, hkv = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
    if three_d:
        if hq is None or hkv is None:
            raise _refuse(
                node, "3D inputs without q_num_heads/kv_num_heads", "set both attributes (the spec requires them)"
            )
        q, k, v = b.to_heads(q, hq), b.to_heads(k, hkv), b.to_heads(v, hkv)
    else:
        hq, hkv = g.dim(q, 1), g.dim(k, 1)
    k, v, offset = _with_past(b, node, k, v, past_k, past_v)
    masks: list[_Mask] = []
    if mask:
        if g.elem_type(mask) == TensorProto.BOOL:
            mask = b.op("Where", mask, b.like(0.0, q), b.like(-np.inf, q))
        masks.append(_add(mask))
    if attrs.get("is_causal", 0):
        masks.append(_causal(-np.inf, offset))
    softmax_type = attrs.get("softmax_precision")
    core = _Core(
        q=q,
        k=k,
        v=v,
        repeat_kv=hq is None or hkv is None or hq != hkv,
        scale=attrs.get("scale"),
        masks=masks,
        softcap=float(attrs.get("softcap", 0.0)),
        softmax_type=softmax_type if softmax_type not in (None, g.elem_type(node.input[0])) else None,
        zero_masked_rows=bool(masks),
    )
    y, probs = _attend(b, core, None if three_d else node.output[0])
    if three_d:
        b.from_heads(y, output=node.output[0])
    if _output(node, 3):
        b.op("Identity", probs, output=_output(node, 3))
    return probs


def decompose_onnx_attention(model: onnx.ModelProto) -> list[Decomposed]:
    """ONNX `Attention` (opset 23+) -> explicit attention, in place."""
    return _run_pass(model, "", "Attention", _onnx_attention) + _run_pass(
        model, "ai.onnx", "Attention", _onnx_attention
    )

"""ONNX `Attention` (opset 23+) -> explicit attention, as onnx's spec and onnxruntime's CPU kernel compute it.

Every input and attribute of opset 24 is decomposed: 3D or 4D Q/K/V, GQA, a past cache or an external
one (`nonpad_kv_seqlen`), boolean or additive masks, causal and sliding-window masks, softcap,
`softmax_precision`, and `qk_matmul_output` in each mode.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from .explicit import (
    _REEXPORT,
    Decomposed,
    _attend,
    _attrs,
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
    _check_only(node, (0, 1, 2, 3, 4, 5, 6), (0, 1, 2, 3), _REEXPORT)
    q, k, v, mask, past_k, past_v, nonpad = (_input(node, i) for i in range(7))
    if nonpad and past_k:
        raise _refuse(node, "both nonpad_kv_seqlen and past_key", "give one cache form (the spec forbids both)")
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
    if nonpad:
        # An external cache of nonpad_kv_seqlen[b] valid keys: this block's queries end there.
        offset = b.op("Sub", b.op("Cast", nonpad, to=TensorProto.INT64), b.dim(q, 2))
    masks = _masks(b, g, node, mask, q, offset, nonpad)
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
    stages: dict[str, str] = {}
    y, probs = _attend(b, core, None if three_d else node.output[0], stages)
    if three_d:
        b.from_heads(y, output=node.output[0])
    if _output(node, 3):
        # What the model reads here comes before the patch: the patch goes on the P.V path only.
        mode = int(attrs.get("qk_matmul_output_mode", 0))
        if mode not in _QK_STAGES:
            raise _refuse(node, f"qk_matmul_output_mode {mode}", "use a mode of 0..3 (the spec defines no other)")
        if mode == 3:
            b.op("CastLike", probs, q, output=_output(node, 3))  # at the output type, as the spec says
        else:
            b.op("Identity", stages[_QK_STAGES[mode]], output=_output(node, 3))
    return probs


# qk_matmul_output_mode -> the stage of the scores it exposes (3: the probabilities).
_QK_STAGES = {0: "scaled", 1: "capped", 2: "masked", 3: "probs"}


def _masks(
    b: _Nodes, g: _Graph, node: onnx.NodeProto, mask: str, q: str, offset: str | None, nonpad: str
) -> list[_Mask]:
    """onnx's order: attn_mask (padded with masked keys to the keys' length), causal, sliding window,
    then the external cache's padding; all 0 or -inf but a float attn_mask, so the order is exact."""
    attrs = _attrs(node)
    masks: list[_Mask] = []
    if mask:
        if g.elem_type(mask) == TensorProto.BOOL:
            mask = b.op("Where", mask, b.like(0.0, q), b.like(-np.inf, q))
        masks.append(_padded_to_keys(mask))
    if attrs.get("is_causal", 0):
        masks.append(_allowed(lambda b, d: b.op("GreaterOrEqual", d, b.const(0)), offset))
    left, right = int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1))
    if left >= 0 or right >= 0:
        masks.append(_allowed(lambda b, d: _in_window(b, d, left, right), offset))
    if nonpad:
        masks.append(_keys_before(nonpad))
    return masks


def _padded_to_keys(mask: str) -> _Mask:
    """An additive attn_mask shorter than the keys (the past not covered) masks the keys it misses."""

    def apply(b: _Nodes, scores: str) -> str:
        missing = b.op("Sub", b.dim(scores, 3), b.dim(mask, -1))
        pads = b.op("Concat", b.const([0]), missing, axis=0)
        full = b.op("Pad", mask, pads, b.like(-np.inf, scores), b.const([-1]))
        return b.op("Add", scores, full)

    return apply


def _allowed(predicate: Callable[[_Nodes, str], str], offset: str | None) -> _Mask:
    """-inf where `predicate` of (query position + offset - key position) is false."""

    def apply(b: _Nodes, scores: str) -> str:
        keep = predicate(b, b.query_minus_key(scores, offset))
        return b.op("Add", scores, b.op("Where", keep, b.like(0.0, scores), b.like(-np.inf, scores)))

    return apply


def _in_window(b: _Nodes, distance: str, left: int, right: int) -> str:
    """Key j is in query p's window when p - left <= j <= p + right (a bound of -1: unbounded)."""
    keep = []
    if left >= 0:
        keep.append(b.op("LessOrEqual", distance, b.const(left)))
    if right >= 0:
        keep.append(b.op("GreaterOrEqual", distance, b.const(-right)))
    return keep[0] if len(keep) == 1 else b.op("And", *keep)


def _keys_before(nonpad: str) -> _Mask:
    """-inf at keys j >= nonpad_kv_seqlen[b]: the external cache's unused tail."""

    def apply(b: _Nodes, scores: str) -> str:
        keys = b.op("Range", b.const(0), b.op("Squeeze", b.dim(scores, 3)), b.const(1))
        ends = b.op("Unsqueeze", b.op("Cast", nonpad, to=TensorProto.INT64), b.const([1]))
        keep = b.op("Unsqueeze", b.op("Less", b.op("Unsqueeze", keys, b.const([0])), ends), b.const([1, 2]))
        return b.op("Add", scores, b.op("Where", keep, b.like(0.0, scores), b.like(-np.inf, scores)))

    return apply


def decompose_onnx_attention(model: onnx.ModelProto) -> list[Decomposed]:
    """ONNX `Attention` (opset 23+) -> explicit attention, in place."""
    return _run_pass(model, "", "Attention", _onnx_attention) + _run_pass(
        model, "ai.onnx", "Attention", _onnx_attention
    )

"""onnxruntime's `com.microsoft::Attention` and `MultiHeadAttention` -> explicit attention."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .explicit import (
    _INT64_MAX,
    _MS,
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
    _refuse,
    _run_pass,
    _with_past,
)

__all__ = ["decompose_ms_attention", "decompose_ms_multihead_attention"]


def _padding_mask(b: _Nodes, g: _Graph, mask: str, k: str, fill: float, node: onnx.NodeProto) -> _Mask:
    """com.microsoft mask_index / key_padding_mask -> adds `fill` at masked keys of [B, H, S, T] scores.

    As onnxruntime's kernels read it: a raw mask ([B, T] or [B, S, T]) masks entries <= 0; a 1D
    index of [B] end positions (or [2B]: ends, then starts) keeps keys start <= j < end.
    `k` is the [B, H, T, D] keys, past included.
    """
    rank = g.rank(mask)
    if rank in (2, 3):
        keep = b.op("Greater", mask, b.op("CastLike", b.const(0), mask))
        keep = b.op("Unsqueeze", keep, b.const([1, 2] if rank == 2 else [1]))
    elif rank == 1:
        batch, keys = b.dim(k, 0), b.dim(k, 2)
        index = b.op("Cast", mask, to=TensorProto.INT64)
        ends = b.slice(index, 0, batch, 0)
        # [2B] carries start positions after the ends; for [B] this slice is empty and pads with 0.
        zeros = b.op("ConstantOfShape", batch, value=numpy_helper.from_array(np.zeros(1, np.int64)))
        starts = b.slice(b.op("Concat", b.slice(index, batch, _INT64_MAX, 0), zeros, axis=0), 0, batch, 0)
        cols = b.op("Unsqueeze", b.op("Range", b.const(0), b.op("Squeeze", keys), b.const(1)), b.const([0]))
        ends, starts = (b.op("Unsqueeze", x, b.const([1])) for x in (ends, starts))  # [B, 1] against [1, T]
        keep = b.op("And", b.op("Less", cols, ends), b.op("GreaterOrEqual", cols, starts))
        keep = b.op("Unsqueeze", keep, b.const([1, 2]))
    else:
        raise _refuse(node, f"a rank-{rank if rank is not None else 'unknown'} mask ({mask})", _REEXPORT)

    def apply(b: _Nodes, scores: str) -> str:
        return b.op("Add", scores, b.op("Where", keep, b.like(0.0, scores), b.like(fill, scores)))

    return apply


def _ms_masks(b: _Nodes, g: _Graph, node: onnx.NodeProto, k: str, offset: str | None) -> list[_Mask]:
    """onnxruntime's com.microsoft order: causal and padding masks (mask_filter_value), then attention_bias."""
    attrs = _attrs(node)
    fill = float(attrs.get("mask_filter_value", -10000.0))
    mask = _input(node, 3 if node.op_type == "Attention" else 4)
    masks = [_causal(fill, offset)] if attrs.get("unidirectional", 0) else []
    if mask:
        masks.append(_padding_mask(b, g, mask, k, fill, node))
    if _input(node, 5):
        masks.append(_add(_input(node, 5)))
    return masks


def _ms_attention(b: _Nodes, g: _Graph, node: onnx.NodeProto) -> str:
    attrs = _attrs(node)
    fix = "fuse without a KV cache, or export with eager attention (attn_implementation='eager')"
    _check_only(node, (0, 1, 2, 3, 5), (0,), fix)
    for name in ("do_rotary", "past_present_share_buffer"):
        if attrs.get(name, 0):
            raise _refuse(node, f"{name}=1", _REEXPORT)
    x, w, bias_in = node.input[0], node.input[1], _input(node, 2)
    heads = int(attrs["num_heads"])
    sizes = list(attrs.get("qkv_hidden_sizes", []))
    if not sizes:
        width = g.dim(w, 1) or (g.dim(bias_in, 0) if bias_in else None)
        if width is None:
            raise _refuse(
                node, "weights of unknown width and no qkv_hidden_sizes", f"set qkv_hidden_sizes, or {_REEXPORT}"
            )
        sizes = [width // 3] * 3
    qkv = b.op("MatMul", x, w)
    if bias_in:
        qkv = b.op("Add", qkv, bias_in)
    bounds = np.cumsum([0, *sizes]).tolist()
    q, k, v = (b.to_heads(b.slice(qkv, bounds[i], bounds[i + 1], -1), heads) for i in range(3))
    core = _Core(q=q, k=k, v=v, repeat_kv=False, scale=attrs.get("scale") or None, masks=_ms_masks(b, g, node, k, None))
    y, probs = _attend(b, core, None)
    b.from_heads(y, output=node.output[0])
    return probs


def _ms_multihead_attention(b: _Nodes, g: _Graph, node: onnx.NodeProto) -> str:
    attrs = _attrs(node)
    fix = "export with eager attention (attn_implementation='eager') or fuse without this MultiHeadAttention input"
    _check_only(node, (0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2), fix)
    q, k, v, bias_in = (_input(node, i) for i in range(4))
    past_k, past_v = _input(node, 6), _input(node, 7)
    heads = int(attrs["num_heads"])
    ranks = (g.rank(q), g.rank(k) if k else None, g.rank(v) if v else None)
    if ranks != (3, 3, 3):
        shown = ", ".join("?" if r is None else str(r) for r in ranks)
        if k and v and None in ranks and set(ranks) <= {3, None}:
            # Neither onnx's nor onnxruntime's symbolic shape inference (shapes.py) could type them.
            raise _refuse(
                node,
                f"query/key/value of unknown ranks ({shown}), which neither onnx's nor onnxruntime's symbolic "
                f"shape inference could infer",
                "save the model with shape information (python -m onnxruntime.tools.symbolic_shape_infer "
                "--auto_merge), or export with eager attention (attn_implementation='eager')",
            )
        raise _refuse(node, f"query/key/value of ranks ({shown}) (packed or per-head layouts)", fix)
    if bias_in:
        dq, dk = b.dim(q, 2), b.dim(k, 2)
        end_k = b.op("Add", dq, dk)
        q = b.op("Add", q, b.slice(bias_in, 0, dq, 0))
        k = b.op("Add", k, b.slice(bias_in, dq, end_k, 0))
        v = b.op("Add", v, b.slice(bias_in, end_k, _INT64_MAX, 0))
    q, k, v = b.to_heads(q, heads), b.to_heads(k, heads), b.to_heads(v, heads)
    k, v, offset = _with_past(b, node, k, v, past_k, past_v)
    core = _Core(
        q=q, k=k, v=v, repeat_kv=False, scale=attrs.get("scale") or None, masks=_ms_masks(b, g, node, k, offset)
    )
    y, probs = _attend(b, core, None)
    b.from_heads(y, output=node.output[0])
    return probs


def decompose_ms_attention(model: onnx.ModelProto) -> list[Decomposed]:
    """onnxruntime's `com.microsoft::Attention` (packed QKV projection inside) -> explicit attention, in place."""
    return _run_pass(model, _MS, "Attention", _ms_attention)


def decompose_ms_multihead_attention(model: onnx.ModelProto) -> list[Decomposed]:
    """onnxruntime's `com.microsoft::MultiHeadAttention` -> explicit attention, in place."""
    return _run_pass(model, _MS, "MultiHeadAttention", _ms_multihead_attention)

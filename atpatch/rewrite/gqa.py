"""onnxruntime's `com.microsoft::GroupQueryAttention` -> explicit attention.

GroupQueryAttention is how onnxruntime-genai's model builder emits every decoder layer (Llama,
Qwen2, Phi-3, ...): packed or separate Q/K/V, rotary inside the op, a KV cache that is either grown
by one step each call or a fixed buffer shared between past and present (genai's CPU default).
What onnxruntime's CPU kernel computes, per batch row b (seqlens_k[b] + 1 = its total length T_b,
total_sequence_length = the longest), which this pass rebuilds op by op:

  first prompt    S == total_sequence_length: the row's past length p_b is 0; else p_b = T_b - S.
  rotary          Q and K rotated at positions p_b + s (half-split or interleaved, the first
                  2 * cos_cache.shape[1] channels of each head).
  present K/V     [B, kv_heads, max(total_sequence_length, past buffer), D]: past[:p_b], then the
                  S new keys, then zeros (the kernel memsets what it does not write).
  scores          over the first T = total_sequence_length present keys (the rest are never
                  attended): Q.K^T * scale, softcap * tanh(scores / softcap), then only keys
                  p_b + i - w < j <= p_b + i take part in query i's softmax (w: local_window_size,
                  when > 0: the last w keys, the query's own included; measured on onnxruntime 1.32).

Variants genai does not emit for these models (position_ids, attention_bias, head_sink, quantized
or window-sized caches, smooth softmax, non-causal, the QK output) are refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from .explicit import (
    _MS,
    _REEXPORT,
    Decomposed,
    _attend,
    _attrs,
    _Core,
    _Graph,
    _input,
    _Nodes,
    _output,
    _refuse,
    _run_pass,
)

__all__ = ["decompose_group_query_attention"]

_INPUTS = (
    "query",
    "key",
    "value",
    "past_key",
    "past_value",
    "seqlens_k",
    "total_sequence_length",
    "cos_cache",
    "sin_cache",
    "position_ids",
    "attention_bias",
    "head_sink",
    "k_scale",
    "v_scale",
    "q_norm_weight",
    "k_norm_weight",
    "query_seqlens",
)
_SUPPORTED_INPUTS = set(range(9))
# Attributes that change nothing at these values; any other value is refused.
_NEUTRAL = {"causal": 1, "smooth_softmax": 0, "qk_output": 0, "sliding_window_cache": 0}
_QUANTIZED = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")
_FIX = "build the model without it (onnxruntime-genai builder defaults), or export with eager attention"


def _check(node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
    if not (_input(node, 5) and _input(node, 6)):
        raise _refuse(node, "no seqlens_k/total_sequence_length (inputs 5, 6, which onnxruntime requires)", _REEXPORT)
    for i, name in enumerate(node.input):
        if name and i not in _SUPPORTED_INPUTS:
            raise _refuse(node, f"input {i} ({_INPUTS[i] if i < len(_INPUTS) else '?'})", _FIX)
    if _output(node, 3):
        raise _refuse(node, "output 3 (output_qk)", _FIX)
    for name, neutral in _NEUTRAL.items():
        if int(attrs.get(name, neutral)) != neutral:
            raise _refuse(node, f"{name}={attrs[name]}", _FIX)
    for name in _QUANTIZED:
        value = attrs.get(name)
        if value not in (None, b"NONE", "NONE", 0):
            raise _refuse(node, f"a quantized KV cache ({name}={value!r})", _FIX)
    if bool(_input(node, 3)) != bool(_input(node, 4)):
        raise _refuse(node, "only one of past_key/past_value", "give both or neither")
    if bool(_input(node, 7)) != bool(_input(node, 8)):
        raise _refuse(node, "only one of cos_cache/sin_cache", "give both or neither")
    if attrs.get("do_rotary", 0) and not _input(node, 7):
        raise _refuse(node, "do_rotary=1 but no cos_cache/sin_cache", "give the caches (inputs 7, 8)")


def _qkv(b: _Nodes, node: onnx.NodeProto, heads: int, kv_heads: int) -> tuple[str, str, str]:
    """Q [B, heads, S, D], K and V [B, kv_heads, S, D] from packed or separate projections."""
    query, key, value = (_input(node, i) for i in range(3))
    if key and value:
        return b.to_heads(query, heads), b.to_heads(key, kv_heads), b.to_heads(value, kv_heads)
    if key or value:
        raise _refuse(node, "only one of key/value", "give both (separate Q/K/V) or neither (packed QKV in query)")
    # Packed [B, S, (heads + 2 kv_heads) * D]: split by head, whatever D is.
    split = b.op("Transpose", b.op("Reshape", query, b.const([0, 0, heads + 2 * kv_heads, -1])), perm=[0, 2, 1, 3])
    bounds = (0, heads, heads + kv_heads, heads + 2 * kv_heads)
    q, k, v = (b.slice(split, bounds[i], bounds[i + 1], 1) for i in range(3))
    return q, k, v


def _rotate(b: _Nodes, x: str, cos: str, sin: str, interleaved: bool) -> str:
    """Rotary embedding of [B, H, S, D] `x`; cos/sin [B, 1, S, R/2] rotate its first R channels."""
    half = b.dim(cos, 3)
    rotary = b.op("Mul", half, b.const([2]))
    rot, rest = b.slice(x, 0, rotary, 3), b.slice(x, rotary, np.iinfo(np.int64).max, 3)
    if interleaved:
        pairs = b.op("Reshape", rot, b.const([0, 0, 0, -1, 2]))
        x1 = b.op("Squeeze", b.slice(pairs, 0, 1, 4), b.const([4]))
        x2 = b.op("Squeeze", b.slice(pairs, 1, 2, 4), b.const([4]))
    else:
        x1, x2 = b.slice(rot, 0, half, 3), b.slice(rot, half, rotary, 3)
    # The kernel's order: x * cos + (-/+ x_pair) * sin.
    y1 = b.op("Sub", b.op("Mul", x1, cos), b.op("Mul", x2, sin))
    y2 = b.op("Add", b.op("Mul", x2, cos), b.op("Mul", x1, sin))
    if interleaved:
        y = b.op("Concat", b.op("Unsqueeze", y1, b.const([4])), b.op("Unsqueeze", y2, b.const([4])), axis=4)
        y = b.op("Reshape", y, b.op("Shape", rot))
    else:
        y = b.op("Concat", y1, y2, axis=3)
    return b.op("Concat", y, rest, axis=3)


def _present(b: _Nodes, new: str, past: str, past_len: str, length: str, out: str) -> str:
    """[B, Hkv, length, D]: past[:p_b], then the new S entries, then zeros (the kernel's non-shared cache)."""
    cat = b.op("Concat", past, new, axis=2) if past else new
    steps = b.dim(new, 2)
    t = b.op("Unsqueeze", b.op("Range", b.const(0), b.op("Squeeze", length), b.const(1)), b.const([0]))  # [1, P]
    p = b.op("Unsqueeze", past_len, b.const([1]))  # [B, 1]
    buffer = b.dim(past, 2) if past else b.const([0])
    # Where each present slot comes from in `cat`: the past itself, or the new block after it.
    source = b.op("Where", b.op("Less", t, p), t, b.op("Add", buffer, b.op("Sub", t, p)))
    last = b.op("Sub", b.dim(cat, 2), b.const([1]))
    source = b.op("Min", source, last)
    index = b.op("Unsqueeze", source, b.const([1, 3]))  # [B, 1, P, 1]
    index = b.op("Expand", index, b.op("Concat", b.dim(cat, 0), b.dim(cat, 1), length, b.dim(cat, 3), axis=0))
    gathered = b.op("GatherElements", cat, index, axis=2)
    written = b.op("Unsqueeze", b.op("Less", t, b.op("Add", p, steps)), b.const([1, 3]))
    return b.op("Where", written, gathered, b.op("CastLike", b.const(0.0, np.float32), new), output=out or None)


def _group_query_attention(b: _Nodes, g: _Graph, node: onnx.NodeProto) -> str:
    attrs = _attrs(node)
    _check(node, attrs)
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    q, k, v = _qkv(b, node, heads, kv_heads)
    past_k, past_v = _input(node, 3), _input(node, 4)
    steps = b.dim(q, 2)
    totals = b.op("Add", b.op("Cast", _input(node, 5), to=TensorProto.INT64), b.const(1))  # [B]
    total = b.op("Reshape", b.op("Cast", _input(node, 6), to=TensorProto.INT64), b.const([1]))
    first_prompt = b.op("Equal", steps, total)
    past_len = b.op("Where", first_prompt, b.const([0]), b.op("Sub", totals, steps))  # [B]: p_b
    # [B, S] positions of the new tokens.
    positions = b.op(
        "Add",
        b.op("Unsqueeze", past_len, b.const([1])),
        b.op("Unsqueeze", b.op("Range", b.const(0), b.op("Squeeze", steps), b.const(1)), b.const([0])),
    )
    if attrs.get("do_rotary", 0):
        cos, sin = (b.op("Unsqueeze", b.op("Gather", _input(node, i), positions, axis=0), b.const([1])) for i in (7, 8))
        interleaved = bool(attrs.get("rotary_interleaved", 0))
        q, k = _rotate(b, q, cos, sin, interleaved), _rotate(b, k, cos, sin, interleaved)
    length = b.op("Max", total, b.dim(past_k, 2)) if past_k else total
    k = _present(b, k, past_k, past_len, length, _output(node, 1))
    v = _present(b, v, past_v, past_len, length, _output(node, 2))
    if past_k:
        # Slots from total_sequence_length on are never attended (a shared buffer's free end):
        # leaving them out gives maps of [B, H, S, T] keys, query i at T - S + i for the longest
        # rows, as atpatch's detector and flag state expect, and spares the softmax the whole buffer.
        k, v = b.slice(k, 0, total, 2), b.slice(v, 0, total, 2)

    # Key j takes part in query i's softmax when p_b + i - w < j <= p_b + i.
    cols = b.op("Range", b.const(0), b.op("Squeeze", total), b.const(1))  # [T]
    last = b.op("Unsqueeze", positions, b.const([1, 3]))  # [B, 1, S, 1]
    allowed = b.op("LessOrEqual", cols, last)
    window = int(attrs.get("local_window_size", -1))
    if window > 0:
        allowed = b.op("And", allowed, b.op("GreaterOrEqual", cols, b.op("Sub", last, b.const(window - 1))))

    def mask(b: _Nodes, scores: str) -> str:
        # The kernel leaves these keys out of the softmax; the lowest float gives them exactly 0.
        return b.op("Where", allowed, scores, b.like(float(np.finfo(np.float32).min), scores))

    elem = g.elem_type(node.input[0])
    scale = float(attrs.get("scale", 0.0))
    core = _Core(
        q=q,
        k=k,
        v=v,
        repeat_kv=heads != kv_heads,
        scale=scale or None,
        masks=[mask],
        softcap=float(attrs.get("softcap", 0.0)),
        # The kernel computes scores and softmax in float32 whatever the model's type.
        softmax_type=TensorProto.FLOAT if elem != TensorProto.FLOAT else None,
    )
    y, probs = _attend(b, core, None)
    b.from_heads(y, output=node.output[0])
    return probs


def decompose_group_query_attention(model: onnx.ModelProto) -> list[Decomposed]:
    """onnxruntime's `com.microsoft::GroupQueryAttention` -> explicit attention, in place."""
    return _run_pass(model, _MS, "GroupQueryAttention", _group_query_attention)

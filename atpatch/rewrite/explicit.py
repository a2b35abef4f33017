"""Building explicit attention (scores -> Softmax -> P.V) in place of one fused node.

What every decomposition shares: static facts about the fused node's inputs (`_Graph`), a builder of
the replacement nodes (`_Nodes`), the attention core all fused ops compute (`_Core`, `_attend`), the
refusal wording, and the pass that swaps every node of one kind (`_run_pass`). The per-op
decompositions live in onnx_attention.py and ms_attention.py; decompose.py lists the passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import FusedAttentionError
from .shapes import infer_shapes

_MS = "com.microsoft"
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Decomposed:
    """One fused node replaced by explicit attention."""

    node: str  # the fused node's name (or its first output when unnamed)
    op: str  # e.g. "ONNX Attention", "com.microsoft::Attention"
    softmax: str  # the name of the Softmax node that replaced the hidden one


def _op_label(domain: str, op_type: str) -> str:
    return f"{domain}::{op_type}" if domain not in ("", "ai.onnx") else f"ONNX {op_type}"


class _Graph:
    """Static facts about the tensors a fused node reads: rank, dims, element type."""

    def __init__(self, model: onnx.ModelProto) -> None:
        inferred = infer_shapes(model)
        self.types = {
            v.name: v.type.tensor_type
            for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        }
        for t in model.graph.initializer:
            self.types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)).tensor_type)
        self.producer = {out: node for node in model.graph.node for out in node.output}

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is not None and t.HasField("shape"):
            return len(t.shape.dim)
        node = self.producer.get(name)
        if node is not None and (node.domain, node.op_type) == (_MS, "EmbedLayerNormalization"):
            # onnx cannot infer contrib ops; its mask_index output is [batch] end positions.
            return 1 if list(node.output).index(name) == 1 else 3
        return None

    def dim(self, name: str, axis: int) -> int | None:
        t = self.types.get(name)
        if t is None or not t.HasField("shape") or not -len(t.shape.dim) <= axis < len(t.shape.dim):
            return None
        d = t.shape.dim[axis]
        return d.dim_value if d.HasField("dim_value") else None

    def elem_type(self, name: str) -> int:
        t = self.types.get(name)
        return t.elem_type if t is not None and t.elem_type else TensorProto.FLOAT


class _Nodes:
    """Builds the replacement nodes of one fused node; each method returns its output's name."""

    def __init__(self, fused: onnx.NodeProto, unique: Callable[[str], str]) -> None:
        self.fused = fused
        self.prefix = f"{fused.name or fused.output[0]}/decomposed"
        self.unique = unique
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs: Any) -> str:
        name = self.unique(f"{self.prefix}/{op_type}")
        out = output or f"{name}_output"
        node = helper.make_node(op_type, list(inputs), [out], name=name, **attrs)
        # dynamo's module scopes stay with the layer, so sites keep naming it.
        node.metadata_props.extend(self.fused.metadata_props)
        self.nodes.append(node)
        return out

    def const(self, value: object, dtype: type = np.int64) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.array(value, dtype=dtype)))

    def like(self, value: float, x: str) -> str:
        """A float scalar in `x`'s element type (CastLike: the model's float type need not be known)."""
        return self.op("CastLike", self.const(value, np.float32), x)

    def dim(self, x: str, axis: int) -> str:
        """`x.shape[axis]` as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis) if axis == -1 else self.op("Shape", x, start=axis, end=axis + 1)

    def slice(self, x: str, start: int | str, end: int | str, axis: int) -> str:
        starts = start if isinstance(start, str) else self.const([start])
        ends = end if isinstance(end, str) else self.const([end])
        return self.op("Slice", x, starts, ends, self.const([axis]))

    def to_heads(self, x: str, heads: int) -> str:
        """[B, S, heads * D] -> [B, heads, S, D]."""
        return self.op("Transpose", self.op("Reshape", x, self.const([0, 0, heads, -1])), perm=[0, 2, 1, 3])

    def from_heads(self, x: str, output: str | None = None) -> str:
        """[B, H, S, D] -> [B, S, H * D]."""
        return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]), self.const([0, 0, -1]), output=output)

    def repeat_kv(self, x: str, q: str) -> str:
        """[B, Hkv, L, D] -> [B, Hq, L, D], kv head i // (Hq / Hkv) for query head i (torch's repeat_interleave)."""
        hq = self.dim(q, 1)
        groups = self.op("Div", hq, self.dim(x, 1))
        one = self.const([1])
        expanded = self.op(
            "Expand", self.op("Unsqueeze", x, self.const([2])), self.op("Concat", one, one, groups, one, one, axis=0)
        )
        shape = self.op("Concat", self.dim(x, 0), hq, self.dim(x, 2), self.dim(x, 3), axis=0)
        return self.op("Reshape", expanded, shape)

    def causal_allowed(self, scores: str, offset: str | None) -> str:
        """Boolean [S, T]: key j is visible to query i when j <= i + offset (offset: past length)."""
        zero, one = self.const(0), self.const(1)
        rows = self.op("Range", zero, self.op("Squeeze", self.dim(scores, 2)), one)
        cols = self.op("Range", zero, self.op("Squeeze", self.dim(scores, 3)), one)
        if offset is not None:
            rows = self.op("Add", rows, self.op("Squeeze", offset))
        return self.op(
            "LessOrEqual", self.op("Unsqueeze", cols, self.const([0])), self.op("Unsqueeze", rows, self.const([1]))
        )

    def query_minus_key(self, scores: str, offset: str | None) -> str:
        """int64 (i + offset) - j for query i and key j of [B, H, S, T] `scores`: [S, T], or
        [B, 1, S, T] when `offset` is per batch ([B]); a [1] offset (the past's length) is shared."""
        zero, one = self.const(0), self.const(1)
        rows = self.op(
            "Unsqueeze", self.op("Range", zero, self.op("Squeeze", self.dim(scores, 2)), one), self.const([1])
        )
        cols = self.op(
            "Unsqueeze", self.op("Range", zero, self.op("Squeeze", self.dim(scores, 3)), one), self.const([0])
        )
        if offset is not None:
            rows = self.op("Add", rows, self.op("Reshape", offset, self.const([-1, 1, 1, 1])))
        return self.op("Sub", rows, cols)


_Mask = Callable[[_Nodes, str], str]  # scores -> masked scores


def _add(term: str) -> _Mask:
    return lambda b, scores: b.op("Add", scores, term)


def _causal(fill: float, offset: str | None) -> _Mask:
    """Add `fill` above the causal diagonal (j > i + offset; offset: the past's length)."""

    def apply(b: _Nodes, scores: str) -> str:
        allowed = b.causal_allowed(scores, offset)
        return b.op("Add", scores, b.op("Where", allowed, b.like(0.0, scores), b.like(fill, scores)))

    return apply


@dataclass
class _Core:
    """What every fused attention op computes once its Q/K/V are [B, H, S, D]."""

    q: str
    k: str
    v: str
    repeat_kv: bool  # kv heads < query heads (GQA/MQA): repeat K/V per query head
    scale: float | None  # None: 1/sqrt(head size)
    masks: list[_Mask]  # applied to the scaled scores in the kernel's order
    softcap: float = 0.0
    softmax_type: int | None = None  # compute the softmax in this type, cast back after
    zero_masked_rows: bool = False  # rows masked to all -inf give 0, not NaN (ONNX Attention's kernel)


def _attend(b: _Nodes, c: _Core, out: str | None, stages: dict[str, str] | None = None) -> tuple[str, str]:
    """Explicit attention: returns (P.V output [B, H, S, Dv], Softmax output).

    `stages`, when given, gets the scores at each step ONNX Attention can expose (qk_matmul_output):
    "scaled" (Q.K^T times scale), "capped" (after softcap), "masked" (after the masks).
    """
    stages = {} if stages is None else stages
    k, v = c.k, c.v
    if c.repeat_kv:
        k, v = b.repeat_kv(k, c.q), b.repeat_kv(v, c.q)
    scores = b.op("MatMul", c.q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    if c.scale is None:
        scale = b.op("Reciprocal", b.op("Sqrt", b.op("CastLike", b.dim(c.q, 3), c.q)))
    else:
        scale = b.like(c.scale, c.q)
    scores = stages["scaled"] = b.op("Mul", scores, scale)
    if c.softcap > 0:
        cap = b.like(c.softcap, c.q)
        scores = b.op("Mul", b.op("Tanh", b.op("Div", scores, cap)), cap)
    stages["capped"] = scores
    for mask in c.masks:
        scores = mask(b, scores)
    stages["masked"] = scores
    if c.softmax_type is not None:
        scores = b.op("Cast", scores, to=c.softmax_type)
    probs = b.op("Softmax", scores, axis=-1)
    if c.zero_masked_rows:
        # The exporters' own NaN guard, Where(IsNaN(P), 0, P): the site finder patches after it.
        probs = b.op("Where", b.op("IsNaN", probs), b.op("CastLike", b.const(0.0, np.float32), probs), probs)
    weights = b.op("CastLike", probs, c.q) if c.softmax_type is not None else probs
    return b.op("MatMul", weights, v, output=out), probs


def _refuse(node: onnx.NodeProto, what: str, fix: str) -> FusedAttentionError:
    return FusedAttentionError(
        f"attention is fused into {_op_label(node.domain, node.op_type)} (node {node.name or node.output[0]}) "
        f"with {what}, which atpatch cannot decompose; {fix}"
    )


_REEXPORT = "re-export with eager attention (attn_implementation='eager', no ORT attention fusion)"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _output(node: onnx.NodeProto, i: int) -> str:
    return node.output[i] if len(node.output) > i else ""


def _with_past(
    b: _Nodes, node: onnx.NodeProto, k: str, v: str, past_k: str, past_v: str
) -> tuple[str, str, str | None]:
    """[B, H, L, D] keys and values with the cache prepended (outputs 1, 2 = present), and the past's length."""
    if bool(past_k) != bool(past_v):
        raise _refuse(node, "only one of past_key/past_value", "give both or neither")
    offset = None
    if past_k:
        offset = b.dim(past_k, 2)
        k = b.op("Concat", past_k, k, axis=2)
        v = b.op("Concat", past_v, v, axis=2)
    for i, x in ((1, k), (2, v)):
        if _output(node, i):
            b.op("Identity", x, output=_output(node, i))
    return k, v, offset


def _check_only(node: onnx.NodeProto, allowed_inputs: Sequence[int], allowed_outputs: Sequence[int], fix: str) -> None:
    names = _INPUT_NAMES.get((node.domain if node.domain != "ai.onnx" else "", node.op_type), ())
    for i, name in enumerate(node.input):
        if name and i not in allowed_inputs:
            raise _refuse(node, f"input {i} ({names[i] if i < len(names) else '?'})", fix)
    for i, name in enumerate(node.output):
        if name and i not in allowed_outputs:
            raise _refuse(node, f"output {i}", fix)


_INPUT_NAMES = {
    ("", "Attention"): ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"),
    (_MS, "Attention"): (
        "input",
        "weights",
        "bias",
        "mask_index",
        "past",
        "attention_bias",
        "past_sequence_length",
    ),
    (_MS, "MultiHeadAttention"): (
        "query",
        "key",
        "value",
        "bias",
        "key_padding_mask",
        "attention_bias",
        "past_key",
        "past_value",
        "past_sequence_length",
        "cache_indirection",
    ),
}


_Decomposer = Callable[[_Nodes, _Graph, onnx.NodeProto], str]


def _run_pass(model: onnx.ModelProto, domain: str, op_type: str, decompose: _Decomposer) -> list[Decomposed]:
    """Replace every `domain::op_type` node of `model`'s main graph in place, keeping graph order."""
    matches = [n for n in model.graph.node if (n.domain or "") == domain and n.op_type == op_type]
    if not matches:
        return []
    g = _Graph(model)
    taken = {n.name for n in model.graph.node}
    counts: dict[str, int] = {}

    def unique(base: str) -> str:
        counts[base] = counts.get(base, 0) + 1
        name = f"{base}_{counts[base]}"
        while name in taken:
            counts[base] += 1
            name = f"{base}_{counts[base]}"
        taken.add(name)
        return name

    label = _op_label(domain, op_type)
    done: list[Decomposed] = []
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not any(node is m for m in matches):
            nodes.append(node)
            continue
        b = _Nodes(node, unique)
        probs = decompose(b, g, node)
        softmax = next(n for n in b.nodes if n.op_type == "Softmax")
        nodes.extend(b.nodes)
        # Shape inference cannot see through contrib ops, but the fused op knew the map is
        # [B, heads, S, T]: declare it, so the site finder sees its rank and head count.
        heads = _heads(node, g)
        cast = next((n for n in b.nodes if n.op_type == "Cast" and n.output[0] == softmax.input[0]), None)
        map_type = _attrs(cast)["to"] if cast is not None else g.elem_type(node.input[0])  # softmax_precision
        for name in dict.fromkeys((softmax.input[0], softmax.output[0], probs)):
            model.graph.value_info.append(helper.make_tensor_value_info(name, map_type, [None, heads, None, None]))
        done.append(Decomposed(node.name or node.output[0], label, softmax.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def _heads(node: onnx.NodeProto, g: _Graph) -> int | None:
    attrs = _attrs(node)
    if "num_heads" in attrs:
        return int(attrs["num_heads"])
    if "q_num_heads" in attrs:
        return int(attrs["q_num_heads"])
    return g.dim(node.input[0], 1) if g.rank(node.input[0]) == 4 else None

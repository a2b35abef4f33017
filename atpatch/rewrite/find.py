"""Finding every attention softmax in an ONNX graph, and saying why other softmaxes are not one.

An attention softmax is a Softmax over the last (key) axis of a rank-4 [B, H, Lq, Lk]
tensor whose scores come from a MatMul (Q . K^T) and whose probabilities feed a MatMul
with the values. Node names and exporter metadata are only hints; this structure is what
every export path measured here shares (see shared/notes/attention-in-onnx.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, numpy_helper

from ..errors import AlreadyPatchedError, FusedAttentionError, InvalidModelError, NoAttentionError
from ..ops import spec
from .decompose import DECOMPOSABLE_OPS
from .shapes import infer_shapes

__all__ = ["AttentionSite", "find_attention_sites"]

# Ops that hide the attention probabilities inside one kernel: nothing to insert after. patch_model
# first decomposes ONNX Attention and com.microsoft Attention/MultiHeadAttention (decompose.py).
FUSED_ATTENTION_OPS = {
    ("", "Attention"),
    ("com.microsoft", "Attention"),
    ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "GroupQueryAttention"),
    ("com.microsoft", "PackedAttention"),
    ("com.microsoft", "PackedMultiHeadAttention"),
    ("com.microsoft", "DecoderAttention"),
    ("com.microsoft", "DecoderMaskedMultiHeadAttention"),
    ("com.microsoft", "DecoderMaskedSelfAttention"),
    ("com.microsoft", "LongformerAttention"),
    ("com.microsoft", "SparseAttention"),
}
# Steps allowed between Q.K^T and the softmax: elementwise (scale, mask, cast, soft-capping), and
# Reshape (DeBERTa-v2/v3 form the scores as [B*H, q, k] and reshape them to [B, H, q, k]; the map
# must still be rank 4 and feed P.V, checked below).
_SCORE_STEPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "CastLike", "Tanh", "Identity", "Reshape"}
# Steps allowed between the softmax and P.V (dtype cast, NaN guard, dropout, DeBERTa's reshape back).
_PROB_STEPS = {"Cast", "CastLike", "Where", "Dropout", "Identity", "Reshape"}
_MATMULS = {"MatMul", "FusedMatMul", "Einsum"}
_SEARCH_DEPTH = 6
# How far up from the scores the [B, S, H, Dh] reshape may sit: Qwen3 normalises each head of q and
# k (RMSNorm, 7 nodes deep) between that reshape and the rotary embedding.
_HEADS_DEPTH = 24
# Soft-capped scores sit 7 steps above the softmax in onnx's own Attention function body
# (Cast, Add mask, Mul cap, Tanh, Div cap, Cast, MatMul), as in eager softcapped exports; a
# decomposed ONNX Attention with every mask (attn_mask, causal, window, cache padding) sits 10 up.
_SCORE_DEPTH = 12
# Map types a patched model runs with: the native kernel's (ops/spec.py), and float64, which the
# op's ONNX function serves (it computes in float32; unflagged rows pass through bit-identical).
# onnxruntime's CPU provider runs no bfloat16 MatMul, so bfloat16 attention cannot run at all.
_MAP_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer: where its probabilities are, and what is known about it."""

    layer: int
    softmax: str  # the Softmax node's name
    tap: str  # the tensor AtPatch reads: the softmax output, or its NaN guard's output
    heads: int | None
    scope: str  # the exporter's module path when it recorded one, else the node name
    notes: tuple[str, ...] = field(default=())
    map_type: onnx.TypeProto | None = field(default=None, compare=False, repr=False)  # the tap's, as inferred


class _Graph:
    """Producer/consumer indexes over a graph, plus the ranks shape inference could find."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers[inp].append(node)
        self.constants = {t.name: t for t in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
        inferred = infer_shapes(model)
        self.types = {
            v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        }

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def dim(self, name: str, axis: int) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        d = t.tensor_type.shape.dim[axis]
        return d.dim_value if d.HasField("dim_value") else None


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _scope(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            # A list like "['', 'bert', ..., 'layer.0.attention.self', 'softmax']".
            parts = [p.strip(" '\"") for p in prop.value.strip("[]").split(",")]
            return ".".join(p for p in parts if p)
    return node.name


def _upstream(
    g: _Graph, start: str, depth: int, follow: Callable[[onnx.NodeProto], Sequence[str]]
) -> Iterator[onnx.NodeProto]:
    """Producers of `start` breadth first, `depth` levels up, through the inputs `follow` names."""
    frontier, seen = [start], set()
    for _ in range(depth):
        nxt: list[str] = []
        for tensor in frontier:
            node = g.producer.get(tensor)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            nxt.extend(follow(node))
        frontier = nxt


def _scores_come_from_matmul(g: _Graph, name: str) -> bool:
    steps = _upstream(g, name, _SCORE_DEPTH, lambda n: n.input if n.op_type in _SCORE_STEPS else ())
    return any(node.op_type in _MATMULS for node in steps)


def _scores_rank(g: _Graph, name: str) -> int | None:
    """The rank of the scores `name`: shape inference's, or where it lost track (DeBERTa's relative
    terms come through GatherElements with computed indices), the rank of the Q.K^T MatMul they
    come from through elementwise steps only, which broadcast to at least its rank."""
    rank = g.rank(name)
    if rank is not None:
        return rank
    elementwise = _SCORE_STEPS - {"Reshape"}
    steps = _upstream(g, name, _SCORE_DEPTH, lambda n: n.input if n.op_type in elementwise else ())
    ranks = {g.rank(node.output[0]) for node in steps if node.op_type in _MATMULS}
    return ranks.pop() if len(ranks) == 1 else None


def _feeds_value_matmul(g: _Graph, name: str) -> bool:
    frontier = [name]
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for tensor in frontier:
            for node in g.consumers.get(tensor, []):
                if node.op_type in _MATMULS and node.input[0] == tensor:
                    return True
                if node.op_type in _PROB_STEPS:
                    nxt.extend(node.output[:1])
        frontier = nxt
    return False


def _nan_guard(g: _Graph, probs: str) -> str | None:
    """The output of `Where(IsNaN(P), 0, P)` consuming `probs`, if the exporter added one."""
    for node in g.consumers.get(probs, []):
        if node.op_type == "Where" and len(node.input) == 3 and node.input[2] == probs:
            cond = g.producer.get(node.input[0])
            if cond is not None and cond.op_type == "IsNaN" and cond.input[0] == probs:
                return node.output[0]
    return None


def _heads_from_reshape(g: _Graph, scores: str) -> int | None:
    """Best effort for graphs without static shapes: the H in a `Reshape(x, [B, S, H, Dh])` upstream."""
    for node in _upstream(g, scores, _HEADS_DEPTH, lambda n: n.input[:1] if n.op_type == "Reshape" else n.input):
        if node.op_type != "Reshape":
            continue
        shape = _constant_shape(g, node.input[1])
        if shape is None or len(shape) != 4:
            continue
        if shape[2] > 0:
            return shape[2]
        width = g.dim(node.input[0], -1)
        if shape[3] > 0 and width:  # view(batch, seq, -1, head_dim): heads = hidden width / head_dim
            return width // shape[3]
    return None


def _constant_shape(g: _Graph, name: str) -> list[int] | None:
    if name in g.constants:
        return [int(v) for v in numpy_helper.to_array(g.constants[name]).ravel()]
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    dims: list[int] = []
    for part in node.input:
        dims.extend([int(v) for v in numpy_helper.to_array(g.constants[part]).ravel()] if part in g.constants else [-1])
    return dims


def _check_map_type(g: _Graph, softmax: onnx.NodeProto, name: str) -> None:
    t = g.types.get(softmax.output[0])
    elem = t.tensor_type.elem_type if t is not None else 0
    if elem and elem not in _MAP_TYPES:
        dtype = TensorProto.DataType.Name(elem).lower()
        raise InvalidModelError(
            f"the attention map of {name} is {dtype}, which onnxruntime's CPU provider cannot run (no {dtype} "
            f"MatMul), so a patched model could not be checked or run; convert the model to float16 or float32 first"
        )


def _refuse_fused_or_patched(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.domain == spec.DOMAIN:
            raise AlreadyPatchedError(
                f"the model is already patched (node {node.name or node.op_type} is {spec.DOMAIN}::{node.op_type}); "
                f"patch the original unpatched model instead"
            )
        key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
        if key in FUSED_ATTENTION_OPS:
            op = f"{key[0]}::{key[1]}" if key[0] else f"ONNX {key[1]}"
            if key in DECOMPOSABLE_OPS:
                raise FusedAttentionError(
                    f"attention is fused into {op} (node {node.name or '?'}); decompose it first with "
                    f"atpatch.rewrite.decompose_fused_attention(model) (patch_model and atpatch-export do this)"
                )
            raise FusedAttentionError(
                f"attention is fused into {op} (node {node.name or '?'}), which atpatch cannot decompose, so its "
                f"probabilities cannot be patched; re-export with eager attention (attn_implementation='eager') "
                f"or SDPA, without ORT's {key[1]} fusion"
            )


def find_attention_sites(model: onnx.ModelProto) -> list[AttentionSite]:
    """Every attention softmax in graph order; raises with a reason when there is none."""
    _refuse_fused_or_patched(model)
    g = _Graph(model)
    sites: list[AttentionSite] = []
    skipped: list[str] = []
    for node in g.graph.node:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        rank = _scores_rank(g, node.input[0])
        axis = _int_attr(node, "axis", -1)
        if rank != 4:
            skipped.append(f"{name}: rank {rank if rank is not None else 'unknown'}, not a [B,H,Lq,Lk] map")
        elif axis not in (-1, 3):
            skipped.append(f"{name}: over axis {axis}, not the key axis")
        elif not _scores_come_from_matmul(g, node.input[0]):
            skipped.append(f"{name}: its scores do not come from a Q.K^T MatMul")
        elif not _feeds_value_matmul(g, node.output[0]):
            skipped.append(f"{name}: its output does not feed a MatMul with the values")
        else:
            _check_map_type(g, node, name)
            guard = _nan_guard(g, node.output[0])
            heads = g.dim(node.output[0], 1) or _heads_from_reshape(g, node.input[0])
            sites.append(
                AttentionSite(
                    layer=len(sites),
                    softmax=name,
                    tap=guard or node.output[0],
                    heads=heads,
                    scope=_scope(node),
                    notes=("after the exporter's NaN guard",) if guard else (),
                    map_type=g.types.get(guard or node.output[0]),
                )
            )
    if not sites:
        detail = "; ".join(skipped) if skipped else "the graph has no Softmax node"
        raise NoAttentionError(
            f"no attention softmax found ({detail}); export the model with eager attention "
            f"(attn_implementation='eager') so each layer has an explicit Softmax"
        )
    return sites

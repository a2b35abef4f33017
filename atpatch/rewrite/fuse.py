"""Fusing each patched attention into one AtPatchAttention node (`atpatch-export --fuse-attention`).

The chain the rewrite leaves at every site,

    MatMul(query, key_t) -> [Mul or Div by a constant] -> [Add bias] -> Softmax -> AtPatch
        -> [Casts to float32] -> MatMul(., value)

becomes one node of the same domain (spec.py, "AtPatchAttention"), in the main graph and in
cross-layer patching's second pass alike. Its native CPU kernel forms the map in its own workspace,
so a small model pays one node per attention instead of six; its ONNX function is the same chain,
so runtimes without the library still run the file. A chain is left as it is when it takes
another shape (a Where mask, the scale after the bias), when something else reads one of its
intermediate tensors (an exposed attention map), or when its map is float16 (the fused kernel
is float32).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops import spec
from ..ops.fused_function import build_fused_function
from .graph_walk import subgraphs, uses

__all__ = ["FuseReport", "fuse_attention"]

_NO_BIAS = "atpatch/fused/no_bias"  # a float32 scalar 0: the bias of chains without an Add


@dataclass(frozen=True)
class FuseReport:
    fused: int  # AtPatch sites now inside AtPatchAttention (both passes counted)
    kept: int  # AtPatch nodes left unfused

    def summary(self) -> str:
        kept = f", {self.kept} left unfused (another chain shape, an exposed map, or float16)" if self.kept else ""
        return f"fused {self.fused} attention chains into {spec.FUSED_OP_TYPE}{kept}"


def _is(node: onnx.NodeProto | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _scalar(name: str, constants: dict[str, np.ndarray]) -> float | None:
    value = constants.get(name)
    if value is None or value.size != 1 or value.dtype != np.float32 or not np.isfinite(value).all():
        return None
    return float(value.reshape(()))


class _Graph:
    """One graph's producers, readers and constants, with those of the graphs enclosing it: a chain in
    cross-layer patching's second pass may start in the main graph (its first layer reads pass 1's scores)."""

    def __init__(self, graph: onnx.GraphProto, outer: _Graph | None = None) -> None:
        self.graph = graph
        self.local = {out for n in graph.node for out in n.output if out}
        self.producer = dict(outer.producer) if outer else {}
        self.producer.update({out: n for n in graph.node for out in n.output if out})
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in uses(node):
                self.readers[name].append(node)
        self.outputs = {v.name for v in graph.output}
        self.constants = dict(outer.constants) if outer else {}
        self.constants.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
        for node in graph.node:
            if _is(node, "Constant") and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.names = (outer.names if outer else set()) | self.local
        self.names |= {v.name for v in graph.input} | {t.name for t in graph.initializer}

    def only_reader(self, name: str, node: onnx.NodeProto) -> bool:
        """Whether `node` alone reads `name`, so that fusing may drop it. A tensor of an enclosing
        graph is never dropped from here (its graph keeps it), so reading it is always fine."""
        if name not in self.local:
            return True
        readers = self.readers.get(name, [])
        return name not in self.outputs and len(readers) == 1 and readers[0] is node


def _scores(g: _Graph, name: str) -> tuple[onnx.NodeProto, onnx.NodeProto | None, float] | None:
    """(the MatMul, the scaling node or None, the scale) whose output is `name`, or None."""
    node = g.producer.get(name)
    scaling, scale = None, 1.0
    if _is(node, "Mul") or _is(node, "Div"):
        a, b = node.input
        constant = _scalar(b, g.constants)
        if constant is None and _is(node, "Mul"):
            a, b = b, a
            constant = _scalar(b, g.constants)
        if constant is None or constant == 0.0:
            return None
        scaling, scale = node, (constant if _is(node, "Mul") else 1.0 / constant)
        node = g.producer.get(a)
        if not g.only_reader(a, scaling):
            return None
    if not _is(node, "MatMul"):
        return None
    return node, scaling, scale


def _fuse_site(g: _Graph, patch: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The AtPatchAttention node for the chain around `patch`, and the chain's nodes; None when it does not match."""
    map_type = next((a.i for a in patch.attribute if a.name == "map_type"), 0)
    if len(patch.input) != len(spec.INPUTS) or map_type not in (0, TensorProto.FLOAT):
        return None
    softmax = g.producer.get(patch.input[0])
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1) if _is(softmax, "Softmax") else None
    if axis not in (-1, 3) or not g.only_reader(patch.input[0], patch):
        return None
    chain = [softmax, patch]
    probs = patch.output[0]
    readers = g.readers.get(probs, [])
    # Hugging Face casts the probabilities to the query's and the values' type: on a float32 map, nothing.
    while len(readers) == 1 and _is(readers[0], "Cast") and _cast_to(readers[0]) == TensorProto.FLOAT:
        if not g.only_reader(probs, readers[0]):
            return None
        chain.append(readers[0])
        probs = readers[0].output[0]
        readers = g.readers.get(probs, [])
    if len(readers) != 1 or not _is(readers[0], "MatMul") or not g.only_reader(probs, readers[0]):
        return None
    values = readers[0]
    if list(values.input) != [probs, values.input[1]] or values.input[1] == probs:  # P.V, P read once
        return None
    logits = softmax.input[0]
    if not g.only_reader(logits, softmax):
        return None
    chain.append(values)
    bias = _NO_BIAS
    add = g.producer.get(logits)
    found = None
    if _is(add, "Add"):
        for side in (0, 1):
            found = _scores(g, add.input[side]) if g.only_reader(add.input[side], add) else None
            if found is not None:
                bias = add.input[1 - side]
                chain.append(add)
                break
    else:
        found = _scores(g, logits)
    if found is None:
        return None
    matmul, scaling, scale = found
    chain.extend(n for n in (scaling, matmul) if n is not None)
    attrs = {a.name: helper.get_attribute_value(a) for a in patch.attribute if a.name == "threshold"}
    outputs = [values.output[0], *(patch.output[1:] if len(patch.output) > 1 else [])]
    fused = helper.make_node(
        spec.FUSED_OP_TYPE,
        [matmul.input[0], matmul.input[1], bias, values.input[1], *patch.input[1:]],
        outputs,
        name=f"{patch.name or 'atpatch'}/fused",
        domain=spec.DOMAIN,
        scale=float(np.float32(scale)),
        **attrs,
    )
    return fused, chain


def _topological(graph: onnx.GraphProto, outer: set[str]) -> None:
    """Reorder `graph`'s nodes so that each comes after what it reads (stable where it can be)."""
    nodes = list(graph.node)
    ready = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer} | {_NO_BIAS}
    ordered: list[onnx.NodeProto] = []
    pending = nodes
    while pending:
        waiting = []
        for node in pending:
            if uses(node) <= ready:
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError("fusing attention left a graph that cannot be ordered (a cycle)")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def _fuse_graph(graph: onnx.GraphProto, outer: _Graph | None) -> tuple[int, int]:
    # Subgraphs first: fusing their chains changes what they read from this graph.
    scope = _Graph(graph, outer)
    fused = kept = 0
    for node in graph.node:
        for sub in subgraphs(node):
            f, k = _fuse_graph(sub, scope)
            fused, kept = fused + f, kept + k
    g = _Graph(graph, outer)
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for node in graph.node:
        if not (node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE):
            continue
        found = _fuse_site(g, node)
        if found is None:
            kept += 1
            continue
        new, chain = found
        fused += 1
        replace[id(node)] = new  # then reordered: the fused node reads what the first MatMul read
        drop.update(id(n) for n in chain if n is not node)  # nodes of enclosing graphs are not in this one
    if replace:
        nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(nodes)
        _topological(graph, outer.names if outer else set())
    return fused, kept


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseReport]:
    """A copy of the patched `model` with each matching attention chain in one AtPatchAttention node."""
    fused_model = onnx.ModelProto()
    fused_model.CopyFrom(model)
    graph = fused_model.graph
    fused, kept = _fuse_graph(graph, None)
    uses_no_bias = any(_NO_BIAS in uses(n) for n in graph.node)
    if uses_no_bias:
        graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), _NO_BIAS))
    if fused:
        opset = next(o.version for o in fused_model.opset_import if o.domain in ("", "ai.onnx"))
        fused_model.functions.append(build_fused_function(opset))
        fused_model.metadata_props.add(key="atpatch.fused_attention", value=str(fused))
    return fused_model, FuseReport(fused, kept)

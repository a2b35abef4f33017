"""Views of a patched model: its second pass inlined (to read its maps), and the original it was made from."""

from __future__ import annotations

import onnx
from onnx import helper

from ..ops import spec
from .crosslayer import FORCED_INPUT, PASS1, PASS2, PAST_FLAGS, PRESENT_FLAGS, SECOND_PASS
from .graph_walk import rename_inputs, uses

__all__ = ["inline_second_pass", "unpatch_model"]


def inline_second_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose pass 2 always runs in the main graph, so that its maps can be read (probe, explain).

    Its outputs equal the patched model's: inputs with no new flag still take pass 1's.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    nodes = list(graph.node)
    index = next((i for i, n in enumerate(nodes) if n.op_type == "If" and n.name == SECOND_PASS), None)
    if index is None:
        return copy
    node = nodes[index]
    then_branch = next(a.g for a in node.attribute if a.name == "then_branch")
    tail = [
        helper.make_node("Identity", [inner.name], [outer], name=f"{PASS2}out/{outer}")
        for inner, outer in zip(then_branch.output, node.output, strict=True)
    ]
    del graph.node[:]
    graph.node.extend([*nodes[:index], *then_branch.node, *tail, *nodes[index + 1 :]])
    return copy


def unpatch_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a patched model computing what the original did: AtPatch bypassed, no second pass,
    and the inputs and outputs patching added (flag state, forced positions) gone."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    nodes = []
    bypass: dict[str, str] = {}
    for node in graph.node:
        if node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE:
            bypass[node.output[0]] = node.input[0]
        elif node.op_type == "If" and node.name == SECOND_PASS:
            else_branch = next(a.g for a in node.attribute if a.name == "else_branch")
            kept = {n.output[0]: n.input[0] for n in else_branch.node}  # Identity(pass 1's output)
            # Pass 1's outputs get their names back.
            bypass.update(
                {kept[inner.name]: outer for inner, outer in zip(else_branch.output, node.output, strict=True)}
            )
        else:
            nodes.append(node)
    for node in nodes:
        for k, out in enumerate(node.output):
            if out.startswith(PASS1) and out in bypass:
                node.output[k] = bypass[out]
    rename_inputs(nodes, bypass)
    outputs = [o for o in graph.output if o.name != PRESENT_FLAGS]
    needed = {o.name for o in outputs}
    live = []
    for node in reversed(nodes):  # dead-code elimination, from the outputs back
        if any(o in needed for o in node.output):
            live.append(node)
            needed |= uses(node)
    del graph.node[:]
    graph.node.extend(reversed(live))
    del graph.output[:]
    graph.output.extend(outputs)
    inputs = [i for i in graph.input if i.name in needed or i.name not in (PAST_FLAGS, FORCED_INPUT)]
    del graph.input[:]
    graph.input.extend(inputs)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return copy

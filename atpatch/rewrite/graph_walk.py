"""Walking an ONNX graph with its subgraphs (an If's branches): what nodes read, and renaming it."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

__all__ = ["rename_inputs", "rename_outputs_inside", "subgraphs", "uses"]


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def uses(node: onnx.NodeProto) -> set[str]:
    """Every outer tensor `node` reads: its inputs, and what its subgraphs take from outside."""
    names = {n for n in node.input if n}
    for graph in subgraphs(node):
        inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        for sub in graph.node:
            names |= uses(sub) - inner
            inner |= set(sub.output)
    return names


def rename_inputs(nodes: Iterable[onnx.NodeProto], names: dict[str, str]) -> None:
    """Rename what `nodes` (and their subgraphs, recursively) read, by `names`."""
    for node in nodes:
        for k, name in enumerate(node.input):
            if name in names:
                node.input[k] = names[name]
        for graph in subgraphs(node):
            rename_inputs(graph.node, names)
            for out in graph.output:
                if out.name in names:
                    out.name = names[out.name]


def rename_outputs_inside(graph: onnx.GraphProto, prefix: str) -> dict[str, str]:
    """Prefix every name a (copied) subgraph defines, so the copy's names stay unique; returns the map."""
    names: dict[str, str] = {}
    for value in graph.input:
        names[value.name] = prefix + value.name
        value.name = names[value.name]
    for node in graph.node:
        for k, out in enumerate(node.output):
            if out:
                names[out] = prefix + out
                node.output[k] = names[out]
        if node.name:
            node.name = prefix + node.name
        for sub in subgraphs(node):
            names.update(rename_outputs_inside(sub, prefix))
    rename_inputs(graph.node, names)
    for out in graph.output:
        out.name = names.get(out.name, out.name)
    return names

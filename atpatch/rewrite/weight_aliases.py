"""One name per weight before cross-layer patching's pass 2 reads the weights.

A weight can go by several names: torch.onnx.export stores equal tensors once and names the others
with Identity nodes (a freshly initialised model's zero biases and unit norm weights), and other
exporters may store them twice. onnxruntime folds such aliases away at session start by renaming
their readers, which it cannot do inside a subgraph: with pass 2's `If` reading them it warned once
per weight, at every session start ("Implicit input name ... cannot be safely updated": 15 lines for
a 2-layer BERT, 114 for BERT-base), and kept them. Resolving them first leaves nothing to warn
about and changes nothing a reader sees.
"""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper

__all__ = ["resolve_weight_aliases"]

_LARGEST = 1 << 20  # bytes: weight matrices are never equal in practice; comparing them would cost a read
_ELEMENT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8}


def _key(tensor: onnx.TensorProto) -> tuple | None:
    """What makes two initializers interchangeable, or None for one not to touch (held in a side file, large)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if math.prod(tensor.dims) * _ELEMENT_BYTES.get(tensor.data_type, 8) > _LARGEST:
        return None
    return tensor.data_type, tuple(tensor.dims), tensor.raw_data or numpy_helper.to_array(tensor).tobytes()


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                _rename(sub, names)


def resolve_weight_aliases(graph: onnx.GraphProto, keep: str = "atpatch/") -> int:
    """Point the readers of an Identity of an initializer, and of an initializer equal in type, shape and
    value to an earlier one, at that initializer, and drop the alias; in place. Names a caller may feed or
    read (graph inputs and outputs) and names starting with `keep` (atpatch's own, looked up by name)
    stay as they are. Returns how many names went."""
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output}
    first: dict[tuple, str] = {}
    names: dict[str, str] = {}
    for tensor in graph.initializer:
        if tensor.name in fixed or tensor.name.startswith(keep):
            continue
        key = _key(tensor)
        if key is None:
            continue
        if key in first:
            names[tensor.name] = first[key]
        else:
            first[key] = tensor.name
    weights = {t.name for t in graph.initializer} - fixed
    aliases = [
        n
        for n in graph.node
        if n.op_type == "Identity"
        and n.input[0] in weights
        and n.output[0] not in fixed
        and not n.output[0].startswith(keep)
    ]
    for node in aliases:
        names[node.output[0]] = names.get(node.input[0], node.input[0])
    if not names:
        return 0
    _rename(graph, names)
    dropped = {id(n) for n in aliases}
    kept_nodes = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    for field in (graph.initializer, graph.value_info):
        kept = [t for t in field if t.name not in names]
        del field[:]
        field.extend(kept)
    return len(names)

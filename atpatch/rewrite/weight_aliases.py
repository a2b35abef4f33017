"""The names under which a graph reads a weight through Identity nodes, for pass 2 to read the weight itself.

torch.onnx.export stores equal tensors once and names the others with Identity nodes (a freshly
initialised model's zero biases and unit norm weights). onnxruntime folds such aliases away at
session start by renaming their readers, which it cannot do inside a subgraph: with cross-layer
patching's pass 2 (an `If` branch) reading them it warned at every session start ("Implicit input
name ... cannot be safely updated": 15 lines for a 2-layer BERT, 114 for BERT-base) and kept them.
Pass 2 reads the weights under their own names instead; pass 1, the user's graph, is left as it was.
"""

from __future__ import annotations

import onnx

__all__ = ["weight_aliases"]


def weight_aliases(graph: onnx.GraphProto) -> dict[str, str]:
    """Output name -> initializer name, for each Identity (or chain of them) of an initializer that is not
    also a graph input (a caller may feed that one: its readers must keep reading the input)."""
    fed = {v.name for v in graph.input}
    root = {t.name: t.name for t in graph.initializer if t.name not in fed}
    for node in graph.node:  # topological order: an alias of an alias follows its source
        if node.op_type == "Identity" and node.input[0] in root and node.output[0]:
            root[node.output[0]] = root[node.input[0]]
    return {name: weight for name, weight in root.items() if name != weight}

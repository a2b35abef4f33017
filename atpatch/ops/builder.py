"""A small builder of ONNX nodes with unique output names, shared by the op's function and the rewrite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["NodeBuilder"]


class NodeBuilder:
    """Accumulates nodes; each method returns its output's name (`prefix` + op + a counter)."""

    def __init__(self, opset: int, prefix: str = "") -> None:
        self.opset = opset
        self.prefix = prefix  # names must be unique across a graph and its subgraphs
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._made: dict[object, Any] = {}

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{self.prefix}{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def once(self, key: object, make: Callable[[], Any]) -> Any:
        """`make()`'s result, built the first time `key` is asked for: values that several parts of a
        graph need (a tensor's shape, a weighted sum) are then computed once per run, not once per part."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def const(self, value: object, dtype: type = np.float32) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.array(value, dtype=dtype)))

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        # ReduceSum took axes as an input from opset 13, the other reductions from 18.
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.const(axes, np.int64), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def to_float(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def any(self, x: str, axes: list[int]) -> str:
        """Logical OR of a bool tensor over `axes` (dropped): ReduceMax of its float cast, > 0."""
        return self.any_positive(self.to_float(x), axes)

    def any_positive(self, x: str, axes: list[int]) -> str:
        """Whether any entry of a float tensor over `axes` (dropped) is > 0."""
        return self.op("Greater", self.reduce("ReduceMax", x, axes, 0), self.const(0.0))

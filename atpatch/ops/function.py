"""The AtPatch op as a model-local ONNX function built only of standard ONNX ops.

A runtime with no AtPatch kernel registered inlines this function, so a patched model
runs anywhere ONNX does. It computes in float32 and casts back, so it serves float16
maps too; the untouched rows are copied straight from the input (bit-identical).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import spec

__all__ = ["build_function"]


class _Body:
    """Accumulates the function's nodes; each method returns its output's name."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: object, dtype: type = np.float32) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.array(value, dtype=dtype)))

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        # ReduceSum took axes as an input from opset 13, the other reductions from 18.
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.const(axes, np.int64), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def to_float(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)


def build_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto for `spec.DOMAIN::spec.OP_TYPE`, written in ai.onnx `opset`."""
    if not spec.MIN_OPSET <= opset <= spec.MAX_OPSET:
        raise ValueError(
            f"ai.onnx opset {opset} is outside {spec.MIN_OPSET}..{spec.MAX_OPSET}; "
            f"re-export the model at an opset in that range (17 or 18 is a safe choice)"
        )
    attention, w1, b1, w2, b2 = spec.INPUTS
    g = _Body(opset)
    zero, one = g.const(0.0), g.const(1.0)
    last, queries, heads = [-1], [-2], [1]

    x = g.op("Cast", attention, to=TensorProto.FLOAT)
    valid = g.op("Greater", x, zero)
    valid_f = g.to_float(valid)
    row_support = g.reduce("ReduceSum", valid_f, last, 1)
    col_rows = g.op("Max", g.reduce("ReduceSum", valid_f, queries, 0), one)

    mass = g.op("Div", g.reduce("ReduceSum", g.op("Mul", x, row_support), queries, 0), col_rows)
    peak = g.op("Max", g.reduce("ReduceMax", x, queries, 0), zero)
    row_max = g.op("Max", g.reduce("ReduceMax", x, last, 1), zero)
    is_top = g.op("And", g.op("GreaterOrEqual", x, row_max), valid)
    top = g.op("Div", g.reduce("ReduceSum", g.to_float(is_top), queries, 0), col_rows)

    per_head = [
        g.reduce("ReduceMean", mass, heads, 0),
        g.op("Max", g.reduce("ReduceMax", mass, heads, 0), zero),
        g.reduce("ReduceMean", peak, heads, 0),
        g.reduce("ReduceMean", top, heads, 0),
    ]
    minus_one = g.const([-1], np.int64)
    features = g.op("Concat", *(g.op("Unsqueeze", f, minus_one) for f in per_head), axis=-1)

    hidden = g.op("Relu", g.op("Add", g.op("MatMul", features, w1), b1))
    score = g.op("Add", g.op("MatMul", hidden, w2), b2)
    threshold = g.op("Constant")
    g.nodes[-1].attribute.append(
        onnx.AttributeProto(name="value_float", ref_attr_name="threshold", type=onnx.AttributeProto.FLOAT)
    )
    flagged = g.op("Unsqueeze", g.op("Greater", score, threshold), g.const([1, 2], np.int64))

    hit = g.op("And", valid, flagged)
    kept = g.op("And", valid, g.op("Not", flagged))
    n_kept = g.reduce("ReduceSum", g.to_float(kept), last, 1)
    kept_sum = g.reduce("ReduceSum", g.op("Where", kept, x, zero), last, 1)
    any_hit = g.op("Greater", g.reduce("ReduceSum", g.to_float(hit), last, 1), zero)
    change = g.op("And", any_hit, g.op("Greater", n_kept, zero))

    scale = g.op("Div", n_kept, g.op("Mul", row_support, kept_sum))
    patched = g.op(
        "Where",
        hit,
        g.op("Div", one, row_support),
        g.op("Where", kept, g.op("Mul", x, scale), zero),
    )
    out = g.op("Where", change, g.op("CastLike", patched, attention), attention)
    g.nodes.append(helper.make_node("Identity", [out], [spec.OUTPUTS[0]]))

    threshold_default = helper.make_attribute("threshold", spec.ATTRIBUTES["threshold"][1])
    function = helper.make_function(
        spec.DOMAIN,
        spec.OP_TYPE,
        list(spec.INPUTS),
        list(spec.OUTPUTS),
        g.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[],
    )
    function.attribute_proto.append(threshold_default)
    function.doc_string = "AtPatch: hot-fix over-attention (see atpatch/ops/spec.py)."
    return function

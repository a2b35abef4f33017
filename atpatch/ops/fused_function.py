"""AtPatchAttention as a model-local ONNX function: the unfused chain it stands for.

MatMul, Mul by `scale`, Add `bias`, Softmax, AtPatch (itself a model-local function, or the
native kernel), MatMul: a runtime without the native library runs exactly what the unfused
patched model runs, but for the scale, which the chain may have applied as a Div.
"""

from __future__ import annotations

import onnx
from onnx import helper

from . import spec

__all__ = ["build_fused_function"]


def build_fused_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto for `spec.DOMAIN::spec.FUSED_OP_TYPE`, written in ai.onnx `opset`."""
    query, key_t, bias, value, *detector = spec.FUSED_INPUTS
    output, flags, scores = spec.FUSED_OUTPUTS

    def attr_constant(name: str, attr: str) -> onnx.NodeProto:
        node = helper.make_node("Constant", [], [name], name=name)
        value = onnx.AttributeProto(name="value_float", ref_attr_name=attr, type=onnx.AttributeProto.FLOAT)
        node.attribute.append(value)
        return node

    threshold = onnx.AttributeProto(name="threshold", ref_attr_name="threshold", type=onnx.AttributeProto.FLOAT)
    patch = helper.make_node(
        spec.OP_TYPE, ["attention", *detector], ["patched", flags, scores], name="patch", domain=spec.DOMAIN
    )
    patch.attribute.append(threshold)
    nodes = [
        helper.make_node("MatMul", [query, key_t], ["raw"], name="scores"),
        attr_constant("scale_value", "scale"),
        helper.make_node("Mul", ["raw", "scale_value"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", bias], ["biased"], name="bias"),
        helper.make_node("Softmax", ["biased"], ["attention"], name="softmax", axis=-1),
        patch,
        helper.make_node("MatMul", ["patched", value], [output], name="values"),
    ]
    function = helper.make_function(
        spec.DOMAIN,
        spec.FUSED_OP_TYPE,
        list(spec.FUSED_INPUTS),
        list(spec.FUSED_OUTPUTS),
        nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(spec.DOMAIN, spec.VERSION)],
        attributes=[],
    )
    function.attribute_proto.extend(helper.make_attribute(n, d) for n, (_, d) in spec.FUSED_ATTRIBUTES.items())
    function.doc_string = "AtPatchAttention: attention with the AtPatch hot-fix inside (see atpatch/ops/spec.py)."
    return function

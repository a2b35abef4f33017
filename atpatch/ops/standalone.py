"""A model holding one AtPatch node whose detector weights and forced positions are graph inputs.

Used to run the op on its own (tests, benchmarks, the native kernel's checks).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from . import spec
from .function import build_function
from .fused_function import build_fused_function

__all__ = ["fused_standalone_model", "standalone_model"]


def standalone_model(opset: int = 17, dtype: int = TensorProto.FLOAT, threshold: float = 0.0) -> onnx.ModelProto:
    """`patched, flags, scores = AtPatch(attention, w1, b1, w2, b2, forced)` with every tensor a graph input.

    `forced` is [forced_batch, forced_keys]: feed [batch, k_len], or 1 on either axis to broadcast.
    """
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("attention", dtype, ["batch", "heads", "q_len", "k_len"]),
        helper.make_tensor_value_info("w1", f, ["features", "hidden"]),
        helper.make_tensor_value_info("b1", f, ["hidden"]),
        helper.make_tensor_value_info("w2", f, ["hidden"]),
        helper.make_tensor_value_info("b2", f, [1]),
        helper.make_tensor_value_info("forced", TensorProto.BOOL, ["forced_batch", "forced_keys"]),
    ]
    outputs = [
        helper.make_tensor_value_info("patched", dtype, ["batch", "heads", "q_len", "k_len"]),
        helper.make_tensor_value_info("flags", TensorProto.BOOL, ["batch", "k_len"]),
        helper.make_tensor_value_info("scores", f, ["batch", "k_len"]),
    ]
    node = helper.make_node(
        spec.OP_TYPE, list(spec.INPUTS), list(spec.OUTPUTS), domain=spec.DOMAIN, threshold=threshold
    )
    graph = helper.make_graph([node], "atpatch_standalone", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(spec.DOMAIN, spec.VERSION)],
        functions=[build_function(opset)],
    )
    model.ir_version = spec.MAX_IR_VERSION
    return model


def fused_standalone_model(opset: int = 17, threshold: float = 0.0, scale: float = 1.0) -> onnx.ModelProto:
    """`output, flags, scores = AtPatchAttention(query, key_t, bias, value, w1, b1, w2, b2, forced)`, every
    tensor a graph input (each of any shape: the op checks them)."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(name, f, None) for name in spec.FUSED_INPUTS[:-1]]
    inputs.append(helper.make_tensor_value_info("forced", TensorProto.BOOL, None))
    outputs = [
        helper.make_tensor_value_info("output", f, None),
        helper.make_tensor_value_info("flags", TensorProto.BOOL, None),
        helper.make_tensor_value_info("scores", f, None),
    ]
    node = helper.make_node(
        spec.FUSED_OP_TYPE,
        list(spec.FUSED_INPUTS),
        list(spec.FUSED_OUTPUTS),
        domain=spec.DOMAIN,
        threshold=threshold,
        scale=scale,
    )
    graph = helper.make_graph([node], "atpatch_fused_standalone", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(spec.DOMAIN, spec.VERSION)],
        functions=[build_function(opset), build_fused_function(opset)],
    )
    model.ir_version = spec.MAX_IR_VERSION
    return model

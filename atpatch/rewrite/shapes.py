"""Shape inference that sees through onnxruntime's contrib ops.

onnx's inference stops at ops it does not define (com.microsoft ones, and contrib ops onnxruntime
registers in the ai.onnx domain such as SimplifiedLayerNormalization): everything after them has
no rank, so attention maps behind them cannot be recognised. onnxruntime's symbolic shape inference
knows those ops; it runs only when the model has such ops, and fills in what onnx's could not.
"""

from __future__ import annotations

import onnx
from onnx import external_data_helper, helper

from ..modelio import SMALL_TENSOR_BYTES

__all__ = ["infer_shapes"]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with value_info for every tensor either inference can type; the input is not modified."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except onnx.shape_inference.InferenceError:
        inferred = model  # e.g. a contrib op with no opset import: what the file declares still helps
    if not _has_ops_onnx_lacks(model):
        return inferred
    symbolic = _symbolic(model)
    if symbolic is None:
        return inferred
    known = {v.name for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output) if _typed(v)}
    out = onnx.ModelProto()
    out.CopyFrom(inferred)
    out.graph.value_info.extend(v for v in symbolic.graph.value_info if v.name not in known and _typed(v))
    return out


def _has_ops_onnx_lacks(model: onnx.ModelProto) -> bool:
    return any(node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type) for node in model.graph.node)


def _typed(value: onnx.ValueInfoProto) -> bool:
    t = value.type.tensor_type
    return bool(t.elem_type) and t.HasField("shape")


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large or on-disk initializers are graph inputs of their type and shape: inference needs
    no weight values (small ones such as shape constants stay), and a multi-GB model is not copied."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {v.name for v in model.graph.input}
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor) or tensor.ByteSize() > SMALL_TENSOR_BYTES:
            if tensor.name not in declared:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    return light


def _symbolic(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # onnxruntime without its tools: onnx's inference is all there is
        return None
    model = _without_weights(model)
    # SymbolicShapeInference.infer_shapes itself, but keeping a partial answer: on an incomplete one
    # it raises, after saving the model into the current folder (sym_shape_infer_temp.onnx).
    try:
        inference = SymbolicShapeInference(2**31 - 1, True, True, 0)  # int_max, auto_merge, guess_output_rank
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_
    except Exception:  # noqa: BLE001 - a graph it cannot follow leaves onnx's answer, not an error
        return None

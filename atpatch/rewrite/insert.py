"""Inserting an AtPatch node after every attention softmax, with the detector's weights inside."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .. import __version__
from ..errors import DetectorMismatchError, InvalidModelError
from ..modelio import model_fingerprint
from ..ops import spec
from ..ops.function import build_function
from ..ops.weights import Detector
from .crosslayer import add_cross_layer, pass1_forced
from .decompose import Decomposed, decompose_fused_attention
from .find import AttentionSite, find_attention_sites

__all__ = ["DIM_PREFIX", "patch_model"]

_MIN_IR_VERSION = 9  # model-local functions with attribute defaults


def _onnx_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise InvalidModelError("the model imports no ai.onnx opset; re-export it with torch.onnx.export")


def _check_detector(detector: Detector, sites: list[AttentionSite], fingerprint: str) -> None:
    if detector.num_layers != len(sites):
        raise DetectorMismatchError(
            f"the detector has {detector.num_layers} layers but this model has {len(sites)} attention layers; "
            f"it was fitted for another model: run atpatch fit on this model"
        )
    for site, heads in zip(sites, detector.heads, strict=True):
        if site.heads is not None and site.heads != heads:
            raise DetectorMismatchError(
                f"the detector's layer {site.layer} is for {heads} heads, the model's has {site.heads}; "
                f"it was fitted for another model: run atpatch fit on this model"
            )
    if detector.model_fingerprint is not None and detector.model_fingerprint != fingerprint:
        raise DetectorMismatchError(
            f"the detector was fitted for model {detector.model_fingerprint}, not this one "
            f"({fingerprint}); run atpatch fit on this model"
        )


_ORT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


def _heads_by_running(model: onnx.ModelProto, sites: list[AttentionSite]) -> list[int]:
    """The head count of each attention map, read off one onnxruntime run on a tiny input.

    For graphs whose shapes are all symbolic; symbolic dims become 2, token ids 1, masks 1. A dim
    only cache inputs (`past...`) name is a cache length and becomes 0, an empty cache: filled with
    2 as well, a KV-cache step's total length (past + new) would not match its mask's.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _zeros_for_weights_on_disk(probe)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=site.tap) for site in sites)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    named = {False: set(), True: set()}  # symbolic dims of other inputs, of cache inputs
    for value in inputs:
        named["past" in value.name].update(d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param)
    cache_lengths = named[True] - named[False]
    feeds = {}
    for value in inputs:
        tensor = value.type.tensor_type
        dtype = _ORT_TYPES.get(tensor.elem_type)
        if dtype is None:
            raise ValueError(f"input {value.name} has a type this check cannot fill")
        shape = [
            d.dim_value if d.HasField("dim_value") else 0 if d.dim_param in cache_lengths else 2
            for d in tensor.shape.dim
        ]
        feeds[value.name] = (
            np.random.default_rng(0).random(shape).astype(dtype)
            if dtype in (np.float32, np.float16, np.float64)
            else np.ones(shape, dtype)
        )
    options = ort.SessionOptions()
    # No constant folding: it would turn the zero weights below into initializers all at once.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [int(m.shape[1]) for m in session.run(None, feeds)]


def _zeros_for_weights_on_disk(probe: onnx.ModelProto) -> None:
    """Replace initializers still in side files by ConstantOfShape zeros of their shape and type.

    Head counts depend on shapes only, so the probe runs without reading a multi-GB model's
    weights; each zero tensor lives only while its consumer runs.
    """
    graph = probe.graph
    kept, zeros = [], []
    for tensor in graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            kept.append(tensor)
            continue
        shape = numpy_helper.from_array(np.array(tensor.dims, np.int64), f"{tensor.name}/atpatch_probe_shape")
        value = helper.make_tensor("value", tensor.data_type, [1], [0])
        zeros.append(helper.make_node("Constant", [], [shape.name], value=shape))
        zeros.append(helper.make_node("ConstantOfShape", [shape.name], [tensor.name], value=value))
    if zeros:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend([*zeros, *nodes])


def _pass_through(model: onnx.ModelProto, sites: list[AttentionSite], heads: int | None) -> Detector:
    known = [site.heads or heads for site in sites]
    if all(h is not None for h in known):
        return Detector.pass_through([h for h in known if h is not None])
    try:
        return Detector.pass_through(_heads_by_running(model, sites))
    except Exception as err:  # noqa: BLE001 - any failure means the same to the user
        raise InvalidModelError(
            f"cannot tell how many heads the attention layers have, which a pass-through patch needs "
            f"({err}); give a detector fitted for this model (atpatch fit)"
        ) from err


def _exposes_map(node: onnx.NodeProto, tap: str, graph_outputs: set[str]) -> bool:
    """A node that only hands the attention map to a graph output (ONNX Attention's qk_matmul_output,
    mode 3): that output is the map the model computed, before the patch, so it is left reading it."""
    return node.op_type in ("Identity", "Cast", "CastLike") and node.input[0] == tap and node.output[0] in graph_outputs


def _noting_decomposed(sites: list[AttentionSite], decomposed: list[Decomposed]) -> list[AttentionSite]:
    by_softmax = {d.softmax: d.op for d in decomposed}
    return [
        replace(s, notes=(*s.notes, f"decomposed from {by_softmax[s.softmax]}")) if s.softmax in by_softmax else s
        for s in sites
    ]


_AXES = ("batch", "heads", "queries", "keys")
DIM_PREFIX = "atpatch_layer"  # the names _declare_same_shape gives a map's dynamic dims start with this


def _map_type(site: AttentionSite) -> dict[str, int]:
    """The AtPatch attribute naming a float16 map's type (spec.py, map_type); none for float32."""
    declared = site.map_type.tensor_type.elem_type if site.map_type is not None else 0
    return {"map_type": declared} if declared == onnx.TensorProto.FLOAT16 else {}


def _declare_same_shape(graph: onnx.GraphProto, site: AttentionSite, out: str, prefix: str) -> None:
    """value_info saying the patched map has its input's shape, and flags and scores [batch, keys].

    onnxruntime lets the kernel write its output into the softmax's buffer (MayInplace) only
    when it can tell the two shapes are equal, which it cannot from unnamed dynamic dims: so
    each unknown dim gets a name, one per layer and axis (the names claim nothing across layers).
    Without this a clean map, which the kernel leaves as it is, was copied in every layer.
    """
    declared = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    tap = declared.get(site.tap)
    if tap is None:
        if site.map_type is None or not site.map_type.tensor_type.HasField("shape"):
            return
        tap = graph.value_info.add(name=site.tap)
        tap.type.CopyFrom(site.map_type)
    dims = tap.type.tensor_type.shape.dim
    if len(dims) != 4 or out in declared:
        return
    for axis, dim in enumerate(dims):
        if not dim.HasField("dim_value") and (not dim.dim_param or dim.dim_param.startswith("unk__")):
            dim.dim_param = f"{DIM_PREFIX}{site.layer}_{_AXES[axis]}"
    graph.value_info.add(name=out).type.CopyFrom(tap.type)
    for name, elem_type in (("flags", onnx.TensorProto.BOOL), ("scores", onnx.TensorProto.FLOAT)):
        column_type = graph.value_info.add(name=f"{prefix}/{name}").type.tensor_type
        column_type.elem_type = elem_type
        for axis in (0, 3):
            column_type.shape.dim.add().CopyFrom(dims[axis])


def patch_model(
    model: onnx.ModelProto,
    detector: Detector | None = None,
    heads: int | None = None,
    base_dir: str | Path | None = None,
    *,
    cross_layer: bool = True,
    forced_input: bool = False,
) -> tuple[onnx.ModelProto, list[AttentionSite]]:
    """A copy of `model` with AtPatch after each attention softmax; the input is not modified.

    Fused attention ops (ONNX Attention, com.microsoft Attention/MultiHeadAttention) are first
    decomposed into explicit attention (rewrite/decompose.py), so their softmax can be patched.
    Without a detector the patch is a pass-through: it flags nothing, so outputs are unchanged.
    `heads` (e.g. from the model's config) stands in for layers whose head count the graph
    does not show. A model whose weights stay on disk (`load_model(..., external_data=False)`)
    needs `base_dir`, their folder; the patched copy keeps referring to them.

    `cross_layer` (default): a position flagged in any layer is patched in every layer, by a second
    pass for the inputs that need one (rewrite/crosslayer.py); off, each layer patches only what it
    flags itself. `forced_input` adds a graph input `atpatch_forced` (bool [batch, key positions]):
    positions patched in every layer whatever the detector says (to measure the ideal patch).
    A model with `past_key_values.*` inputs (a KV-cache decoder) gets the flag state input and output.
    """
    opset = _onnx_opset(model)
    if not spec.MIN_OPSET <= opset <= spec.MAX_OPSET:
        raise InvalidModelError(
            f"the model uses ai.onnx opset {opset}; atpatch supports {spec.MIN_OPSET}..{spec.MAX_OPSET}: "
            f"re-export at opset 17 or 18"
        )
    fingerprint = model_fingerprint(model, base_dir)  # of the model as given: detectors are fitted for it
    model, decomposed = decompose_fused_attention(model)
    sites = _noting_decomposed(find_attention_sites(model), decomposed)
    detector = detector or _pass_through(model, sites, heads)
    _check_detector(detector, sites, fingerprint)

    patched = onnx.ModelProto()
    patched.CopyFrom(model)
    graph = patched.graph
    by_output = {out: i for i, node in enumerate(graph.node) for out in node.output}
    decoder = any(value.name.startswith("past_key_values.") for value in graph.input)
    graph_outputs = {value.name for value in graph.output}
    forced, forced_nodes = pass1_forced(graph, sites[0].tap, decoder, forced_input, opset)
    new_nodes: dict[int, list[onnx.NodeProto]] = {by_output[sites[0].tap]: forced_nodes}
    patch_nodes = []
    for site, layer in zip(sites, detector.layers, strict=True):
        prefix = f"atpatch/layer{site.layer}"
        weights = []
        for param in spec.INPUTS[1:-1]:
            tensor = numpy_helper.from_array(getattr(layer, param), name=f"{prefix}/{param}")
            graph.initializer.append(tensor)
            weights.append(tensor.name)
        out = f"{site.tap}/atpatched"
        for node in graph.node:
            if _exposes_map(node, site.tap, graph_outputs):
                continue
            for k, name in enumerate(node.input):
                if name == site.tap:
                    node.input[k] = out
        node = helper.make_node(
            spec.OP_TYPE,
            [site.tap, *weights, forced],
            [out, f"{prefix}/flags", f"{prefix}/scores"],
            name=f"{prefix}/AtPatch",
            domain=spec.DOMAIN,
            threshold=float(layer.threshold),
            **_map_type(site),
        )
        new_nodes.setdefault(by_output[site.tap], []).append(node)
        patch_nodes.append(node)
        _declare_same_shape(graph, site, out, prefix)

    # Rebuild the node list with each AtPatch right after its tap's producer: stays topological.
    nodes = list(graph.node)
    del graph.node[:]
    for i, node in enumerate(nodes):
        graph.node.append(node)
        graph.node.extend(new_nodes.get(i, []))

    patched.opset_import.append(helper.make_opsetid(spec.DOMAIN, spec.VERSION))
    patched.functions.append(build_function(opset))
    patched.ir_version = min(max(patched.ir_version, _MIN_IR_VERSION), spec.MAX_IR_VERSION)
    meta = {
        "atpatch.version": __version__,
        "atpatch.layers": str(len(sites)),
        "atpatch.detector": detector.kind,
        "atpatch.source_fingerprint": fingerprint,
        "atpatch.cross_layer": "0",  # add_cross_layer sets it
        "atpatch.spread": str(detector.spread),
        "atpatch.joint": json.dumps(detector.describe()["joint"]),
        "atpatch.confirm": json.dumps(detector.describe()["confirm"]),
        "atpatch.calibration": json.dumps(detector.describe()["calibration"]),
    }
    kept = [p for p in patched.metadata_props if p.key not in meta]
    del patched.metadata_props[:]
    patched.metadata_props.extend(kept)
    for key, value in meta.items():
        patched.metadata_props.add(key=key, value=value)
    if cross_layer:
        add_cross_layer(patched, detector.spread, detector.joint, detector.word_pieces, detector.confirm)
    return patched, sites

"""Inserting an AtPatch node after every attention softmax, with the detector's weights inside."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .. import __version__
from ..detector import Detector
from ..errors import DetectorMismatchError, InvalidModelError
from ..modelio import model_fingerprint
from ..ops import spec
from ..ops.function import build_function
from .find import AttentionSite, find_attention_sites

__all__ = ["patch_model"]

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
    if detector.model_fingerprint is not None and detector.model_fingerprint != fingerprint:
        raise DetectorMismatchError(
            f"the detector was fitted for model {detector.model_fingerprint}, not this one "
            f"({fingerprint}); run atpatch fit on this model"
        )


def patch_model(
    model: onnx.ModelProto, detector: Detector | None = None
) -> tuple[onnx.ModelProto, list[AttentionSite]]:
    """A copy of `model` with AtPatch after each attention softmax; the input is not modified.

    Without a detector the patch is a pass-through: it flags nothing, so outputs are unchanged.
    """
    opset = _onnx_opset(model)
    if not spec.MIN_OPSET <= opset <= spec.MAX_OPSET:
        raise InvalidModelError(
            f"the model uses ai.onnx opset {opset}; atpatch supports {spec.MIN_OPSET}..{spec.MAX_OPSET}: "
            f"re-export at opset 17 or 18"
        )
    sites = find_attention_sites(model)
    detector = detector or Detector.pass_through(len(sites))
    fingerprint = model_fingerprint(model)
    _check_detector(detector, sites, fingerprint)

    patched = onnx.ModelProto()
    patched.CopyFrom(model)
    graph = patched.graph
    by_output = {out: i for i, node in enumerate(graph.node) for out in node.output}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for site, layer in zip(sites, detector.layers, strict=True):
        prefix = f"atpatch/layer{site.layer}"
        weights = []
        for param in spec.INPUTS[1:]:
            tensor = numpy_helper.from_array(getattr(layer, param), name=f"{prefix}/{param}")
            graph.initializer.append(tensor)
            weights.append(tensor.name)
        out = f"{site.tap}/atpatched"
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name == site.tap:
                    node.input[k] = out
        node = helper.make_node(
            spec.OP_TYPE,
            [site.tap, *weights],
            [out],
            name=f"{prefix}/AtPatch",
            domain=spec.DOMAIN,
            threshold=float(layer.threshold),
        )
        new_nodes.setdefault(by_output[site.tap], []).append(node)

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
    }
    kept = [p for p in patched.metadata_props if p.key not in meta]
    del patched.metadata_props[:]
    patched.metadata_props.extend(kept)
    for key, value in meta.items():
        patched.metadata_props.add(key=key, value=value)
    return patched, sites

"""Reading a model's post-softmax attention maps in onnxruntime, batch by batch.

A probe copy of the model exposes each attention layer's map as an extra graph output. For
a patched model it exposes the map both before and after its AtPatch node, and the detector
it carries can be read back, so a user can see what was flagged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..ops import spec
from ..ops.reference import LayerDetector
from ..rewrite import decompose_fused_attention, find_attention_sites
from ..ops.weights import Detector

__all__ = ["AttentionProbe", "ProbeOutput", "read_detector"]


@dataclass(frozen=True)
class ProbeOutput:
    outputs: list[np.ndarray]  # the model's own outputs
    before: list[np.ndarray]  # per layer: the softmax's map [B, H, Lq, Lk]
    after: list[np.ndarray] | None  # per layer: the map after AtPatch (patched models only)


def _patch_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE]


def read_detector(model: onnx.ModelProto) -> Detector:
    """The detector a patched model carries, read back from its initializers and attributes."""
    nodes = _patch_nodes(model)
    if not nodes:
        raise ValueError("the model carries no AtPatch node; patch it first with atpatch-export")
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    for node in nodes:
        threshold = next((a.f for a in node.attribute if a.name == "threshold"), spec.ATTRIBUTES["threshold"][1])
        params = dict(zip(spec.INPUTS[1:], (weights[name] for name in node.input[1:]), strict=True))
        layers.append(LayerDetector(threshold=float(threshold), **params))
    kind = next((p.value for p in model.metadata_props if p.key == "atpatch.detector"), "fitted")
    return Detector(layers=tuple(layers), kind=kind)


class AttentionProbe:
    """Run a model and collect every attention layer's map (one onnxruntime session, reused)."""

    def __init__(self, model: onnx.ModelProto, *, use_native: bool | None = None) -> None:
        from ..runtime import create_session

        patches = _patch_nodes(model)
        if not patches:  # fused attention hides its map: probe the explicit form that patching inserts into
            model = decompose_fused_attention(model)[0]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.patched = bool(patches)
        if self.patched:
            self.before_names = [n.input[0] for n in patches]
            after_names: list[str] = [n.output[0] for n in patches]
        else:
            self.before_names = [site.tap for site in find_attention_sites(model)]
            after_names = []
        self.num_layers = len(self.before_names)
        self.model_outputs = [o.name for o in model.graph.output]
        existing = set(self.model_outputs)
        for name in (*self.before_names, *after_names):
            if name not in existing:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))  # type left to the runtime
        self._fetch = [*self.model_outputs, *self.before_names, *after_names]
        self.input_names = [i.name for i in model.graph.input]
        self.session = create_session(probe, use_native=use_native)

    def model_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`feeds` less what the model does not take (exports drop unused inputs such as token_type_ids)."""
        return {name: value for name, value in feeds.items() if name in self.input_names}

    def run(self, feeds: dict[str, np.ndarray]) -> ProbeOutput:
        values = self.session.run(self._fetch, self.model_feeds(feeds))
        n_out, n_layers = len(self.model_outputs), self.num_layers
        outputs = values[:n_out]
        before = values[n_out : n_out + n_layers]
        after = values[n_out + n_layers :] if self.patched else None
        return ProbeOutput(outputs, before, after)

    def iter_batches(self, feeds: dict[str, np.ndarray], batch_size: int = 32) -> Iterator[tuple[slice, ProbeOutput]]:
        """Run `feeds` in slices along the batch axis, so memory stays bounded by one batch's maps."""
        total = len(next(iter(feeds.values())))
        for start in range(0, total, batch_size):
            part = slice(start, min(start + batch_size, total))
            yield part, self.run({k: v[part] for k, v in feeds.items()})

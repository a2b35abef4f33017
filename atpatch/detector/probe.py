"""Reading a model's post-softmax attention maps in onnxruntime, batch by batch.

A probe copy of the model exposes each attention layer's map as an extra graph output. For
a patched model it exposes, per layer, the map before and after its AtPatch node, what that
layer flagged and what it patched, in the pass each input took (cross-layer patching runs a
second pass for inputs with a flag; the probe always runs it, and picks per input), and the
detector it carries can be read back, so a user can see what was flagged and where.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InvalidModelError
from ..ops import spec
from ..ops.joint import JointRule
from ..ops.reference import LayerDetector
from ..ops.weights import Calibration, Detector, read_confirm
from ..rewrite import decompose_fused_attention, find_attention_sites
from ..rewrite.confirm import CANDIDATES
from ..rewrite.crosslayer import JOINT, PASS2, ROWS, UNION
from ..rewrite.positions import WORD_PIECES
from ..rewrite.unpatch import inline_second_pass

__all__ = ["AttentionProbe", "ProbeOutput", "patch_nodes", "read_calibration", "read_detector"]


@dataclass(frozen=True)
class ProbeOutput:
    outputs: list[np.ndarray]  # the model's own outputs
    before: list[np.ndarray]  # per layer: the softmax's map [B, H, Lq, Lk] (of the pass each input took)
    after: list[np.ndarray] | None = None  # per layer: the map after AtPatch (patched models only)
    flagged: list[np.ndarray] | None = None  # per layer [B, Lk]: what its detector flagged, first pass
    patched: list[np.ndarray] | None = None  # per layer [B, Lk]: the positions it patched (flagged or forced)
    union: np.ndarray | None = None  # [B, Lk]: flagged in any layer (or forced), or patched by the effect check
    second_pass: np.ndarray | None = None  # [B]: inputs whose outputs come from the second pass
    joint: np.ndarray | None = None  # [B, Lk]: what the joint rule over layers flagged (None: no joint rule)
    tried: np.ndarray | None = None  # [B]: inputs the effect check tried (each makes the batch run pass 2)


def patch_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The main graph's AtPatch nodes (the first pass), in graph order."""
    return [n for n in model.graph.node if n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE]


def _check_version(model: onnx.ModelProto) -> None:
    version = next((int(o.version) for o in model.opset_import if o.domain == spec.DOMAIN), spec.VERSION)
    if version != spec.VERSION:
        raise InvalidModelError(
            f"the model was patched with {spec.DOMAIN} op version {version}; it still runs as it is, but to "
            f"fit, evaluate or explain it, patch the original model again with this atpatch (op version {spec.VERSION})"
        )


def read_detector(model: onnx.ModelProto) -> Detector:
    """The detector a patched model carries, read back from its initializers and attributes."""
    nodes = patch_nodes(model)
    if not nodes:
        raise ValueError("the model carries no AtPatch node; patch it first with atpatch-export")
    _check_version(model)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    params = spec.INPUTS[1:-1]  # w1, b1, w2, b2 (the last input is `forced`)
    for node in nodes:
        threshold = next((a.f for a in node.attribute if a.name == "threshold"), spec.ATTRIBUTES["threshold"][1])
        values = dict(zip(params, (weights[name] for name in node.input[1 : 1 + len(params)]), strict=True))
        layers.append(LayerDetector(threshold=float(threshold), **values))
    meta = {p.key: p.value for p in model.metadata_props}
    joint = json.loads(meta.get("atpatch.joint", "null"))
    return Detector(
        layers=tuple(layers),
        kind=meta.get("atpatch.detector", "fitted"),
        spread=int(meta.get("atpatch.spread", 0)),
        joint=None if joint is None else JointRule(tuple(joint["weights"]), joint["threshold"], joint["window"]),
        word_pieces=weights.get(WORD_PIECES),
        calibration=read_calibration(model),
        confirm=read_confirm(json.loads(meta.get("atpatch.confirm", "null"))),
    )


def read_calibration(model: onnx.ModelProto) -> Calibration | None:
    """What a patched model's thresholds promise, from its metadata alone (no weights read); None: not recorded."""
    meta = {p.key: p.value for p in model.metadata_props}
    return Calibration.read(json.loads(meta.get("atpatch.calibration", "null")))


class AttentionProbe:
    """Run a model and collect every attention layer's map (one onnxruntime session, reused)."""

    def __init__(self, model: onnx.ModelProto, *, use_native: bool | None = None) -> None:
        from ..runtime import create_session

        first = patch_nodes(model)
        self.patched = bool(first)
        if not self.patched:  # fused attention hides its map: probe the explicit form that patching inserts into
            model = decompose_fused_attention(model)[0]
            self.before_names = [site.tap for site in find_attention_sites(model)]
            fetch: list[str] = []
        else:
            _check_version(model)
            model = inline_second_pass(model)
            by_name = {n.name: n for n in model.graph.node}
            second = [by_name.get(PASS2 + n.name) for n in first]
            self.two_pass = all(n is not None for n in second)
            self.before_names = [n.input[0] for n in first]
            fetch = [*(n.output[0] for n in first), *(n.output[1] for n in first)]
            self.has_joint = any(JOINT in n.output for n in model.graph.node)
            self.has_confirm = any(CANDIDATES in n.output for n in model.graph.node)
            if self.two_pass:
                fetch += [n.input[0] for n in second if n is not None]
                fetch += [o for n in second if n is not None for o in n.output[:2]]
                fetch += [ROWS, UNION] + ([JOINT] if self.has_joint else [])
                fetch += [CANDIDATES] if self.has_confirm else []
            forced = first[0].input[-1]
            initializers = {t.name: t for t in model.graph.initializer}
            self.forced_value = numpy_helper.to_array(initializers[forced]) if forced in initializers else None
            if self.forced_value is None:
                fetch.append(forced)
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.num_layers = len(self.before_names)
        self.model_outputs = [o.name for o in model.graph.output]
        existing = set(self.model_outputs)
        self._extra = [*self.before_names, *fetch]
        for name in self._extra:
            if name not in existing:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))  # type left to the runtime
                existing.add(name)
        wanted = [*self.model_outputs, *self._extra]
        self._fetch = list(dict.fromkeys(wanted))  # onnxruntime returns each name once
        self._order = [self._fetch.index(name) for name in wanted]
        self.input_names = [i.name for i in model.graph.input]
        self.session = create_session(probe, use_native=use_native)

    def model_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`feeds` less what the model does not take (exports drop unused inputs such as token_type_ids)."""
        return {name: value for name, value in feeds.items() if name in self.input_names}

    def run(self, feeds: dict[str, np.ndarray]) -> ProbeOutput:
        got = self.session.run(self._fetch, self.model_feeds(feeds))
        values = [got[i] for i in self._order]
        n_out, n = len(self.model_outputs), self.num_layers
        outputs, rest = values[:n_out], values[n_out:]
        before = rest[:n]
        if not self.patched:
            return ProbeOutput(outputs, before)
        after, flagged, rest = rest[n : 2 * n], rest[2 * n : 3 * n], rest[3 * n :]
        forced = self.forced_value if self.forced_value is not None else rest.pop()
        first_patched = [f | forced for f in flagged]
        if not self.two_pass:
            union = functools.reduce(np.logical_or, first_patched)
            return ProbeOutput(outputs, before, after, flagged, first_patched, union, np.zeros(len(union), bool))
        before2, after2, flags2 = rest[:n], rest[n : 3 * n : 2], rest[n + 1 : 3 * n : 2]
        rows, union = rest[3 * n], rest[3 * n + 1]
        joint = rest[3 * n + 2] if self.has_joint else None
        # Pass 2 patched the effect check's candidates too; those whose class it left alone keep pass 1.
        tried = rest[3 * n + 2 + int(self.has_joint)] if self.has_confirm else np.zeros(len(rows), bool)
        kept_union = union & ~(tried & ~rows)[:, None]

        def pick(second: list[np.ndarray], first_: list[np.ndarray]) -> list[np.ndarray]:
            return [np.where(rows.reshape(-1, *[1] * (a.ndim - 1)), a, b) for a, b in zip(second, first_, strict=True)]

        patched2 = [f | union for f in flags2]
        return ProbeOutput(
            outputs,
            pick(before2, before),
            pick(after2, after),
            flagged,
            pick(patched2, first_patched),
            kept_union,
            rows,
            joint,
            tried,
        )

    def iter_batches(self, feeds: dict[str, np.ndarray], batch_size: int = 32) -> Iterator[tuple[slice, ProbeOutput]]:
        """Run `feeds` in slices along the batch axis, so memory stays bounded by one batch's maps."""
        total = len(next(iter(feeds.values())))
        for start in range(0, total, batch_size):
            part = slice(start, min(start + batch_size, total))
            yield part, self.run({k: v[part] for k, v in feeds.items()})

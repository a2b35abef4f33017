"""ORT's transformer fusions on a patched graph: LayerNorm, GELU, SkipLayerNorm, BiasGelu... but not attention.

Patching keeps attention unfused (the AtPatch node must sit between the softmax and P.V), so
a patched model misses onnxruntime's fused `Attention` kernel; everything else that
`onnxruntime.transformers.optimize_model` fuses still applies. Attention fusion is switched
off, and the pass is refused if it would touch an AtPatch node or the softmax it follows.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import onnx

from ..errors import AtPatchError
from ..ops import spec
from .crosslayer import SECOND_PASS

__all__ = ["FusionReport", "fuse_for_ort"]

# Per-family model type for onnxruntime.transformers; an encoder's fusions fit most graphs.
_MODEL_TYPES = {"gpt2": "gpt2", "vit": "vit"}


@dataclass(frozen=True)
class FusionReport:
    """What the optimizer fused, as {fused op: how many more than before}, and what it had to leave alone."""

    fused: dict[str, int] = field(default_factory=dict)
    atpatch_nodes: int = 0
    softmaxes: int = 0

    def summary(self) -> str:
        fused = ", ".join(f"{n} {op}" for op, n in sorted(self.fused.items())) or "nothing"
        return (
            f"ORT fusions: {fused}; attention left unfused ({self.softmaxes} Softmax, "
            f"{self.atpatch_nodes} AtPatch kept)"
        )


def _kept(model: onnx.ModelProto) -> tuple[int, int]:
    ops = Counter((n.domain, n.op_type) for n in model.graph.node)
    return ops[(spec.DOMAIN, spec.OP_TYPE)], ops[("", "Softmax")] + ops[("ai.onnx", "Softmax")]


def fuse_for_ort(model: onnx.ModelProto, family: str = "bert") -> tuple[onnx.ModelProto, FusionReport]:
    """A copy of the (patched) `model` with ORT's non-attention fusions applied, and what fused.

    Runs the optimizer's graph fusions only (opt_level 0: no onnxruntime session, which would
    inline the AtPatch function). The result needs onnxruntime (its com.microsoft ops).
    Weights left on disk stay references: the fusions used read shapes and small constants.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if any(n.op_type == "If" and n.name == SECOND_PASS for n in model.graph.node):
        raise AtPatchError(
            "onnxruntime's transformer fusions cannot see into cross-layer patching's second pass: fuse before "
            "adding cross-layer patching (patch_model(..., cross_layer=False), fuse_for_ort, then add_cross_layer)"
        )
    model_type = _MODEL_TYPES.get(family, "bert")
    options = FusionOptions(model_type)
    options.enable_attention = False  # would fuse away the softmax AtPatch follows, or fail on it
    before = _kept(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every pattern it tried and did not match
    try:
        optimized = optimize_model(copy, model_type=model_type, optimization_options=options, opt_level=0)
    except Exception as err:  # noqa: BLE001 - its failures are many and internal; the fix is the same
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AtPatchError(
            f"onnxruntime's transformer optimizer failed on this graph ({type(err).__name__}: {first}); "
            f"export without --optimize"
        ) from err
    finally:
        quiet.setLevel(level)
    result = optimized.model
    domains = {n.domain for n in result.graph.node} - {o.domain for o in result.opset_import}
    # The optimizer adds com.microsoft ops without always importing the domain (the checker requires it).
    result.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in sorted(domains) if d not in ("", "ai.onnx"))
    after = _kept(result)
    if after != before:
        raise AtPatchError(
            f"onnxruntime's optimizer changed the attention ({before[0]} AtPatch / {before[1]} Softmax became "
            f"{after[0]} / {after[1]}); export without --optimize"
        )
    # Count what is new: an export may already hold e.g. LayerNormalization ops.
    had = Counter(n.op_type for n in model.graph.node)
    has = Counter(n.op_type for n in result.graph.node)
    fused = {op: has[op] - had[op] for op in optimized.get_fused_operator_statistics() if has[op] > had[op]}
    return result, FusionReport(fused, *after)

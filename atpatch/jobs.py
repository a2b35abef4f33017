"""The export job behind `atpatch-export`: export or load a model, patch it, and write it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .detector import Detector
from .detector.calibrate import NEVER
from .errors import AtPatchError
from .modelio import check_output_path, load_model, save_model
from .ops import spec
from .rewrite import AttentionSite, patch_model
from .rewrite.crosslayer import add_cross_layer
from .rewrite.fuse import FuseReport, fuse_attention
from .rewrite.optimize import FusionReport, fuse_for_ort
from .rewrite.positions import WORD_PIECES
from .serving.genai import is_genai_folder, patch_genai_folder
from .serving.triton import TritonRepository, check_target, kernel_library, model_name_for, write_repository

__all__ = ["ExportOptions", "ExportReport", "run_export"]


@dataclass(frozen=True)
class ExportOptions:
    """What `atpatch-export` was asked to do; validates itself."""

    output: Path | None = None
    model: Path | None = None
    hf: Path | None = None
    detector: Path | None = None
    opset: int = 17
    dynamo: bool = False
    with_past: bool = False  # a causal LM exported as one generation step with its KV cache
    attention: str = "eager"
    patch: bool = True
    cross_layer: bool = True  # a position flagged in any layer is patched in every layer
    optimize: bool = False  # ORT's transformer fusions (LayerNorm, GELU, ...) on the patched graph
    fuse_attention: bool = False  # each patched attention in one AtPatchAttention node
    triton: Path | None = None  # a Triton model repository to write
    triton_name: str | None = None
    triton_mount: str | None = None

    def __post_init__(self) -> None:
        if self.output is None and self.triton is None:
            raise AtPatchError("nothing to write: give -o FILE, --triton DIR, or both")
        if self.triton is None and (self.triton_name or self.triton_mount):
            raise AtPatchError("--triton-name and --triton-mount describe a --triton repository; add --triton DIR")
        if (self.model is None) == (self.hf is None):
            raise AtPatchError("give exactly one model: an ONNX file (atpatch-export model.onnx) or --hf FOLDER")
        if self.model is not None and (self.dynamo or self.opset != 17 or self.attention != "eager"):
            raise AtPatchError(
                "--dynamo, --opset and --attention apply to --hf exports only; an ONNX file keeps its own"
            )
        if self.hf is not None and not spec.MIN_OPSET <= self.opset <= spec.MAX_OPSET:
            raise AtPatchError(
                f"--opset {self.opset} is outside {spec.MIN_OPSET}..{spec.MAX_OPSET}, the opsets atpatch patches; "
                f"use 17 (the default) or 18"
            )
        if self.model is not None and self.with_past:
            raise AtPatchError("--with-past applies to --hf exports only; an ONNX file keeps its inputs")
        if not self.patch and self.detector is not None:
            raise AtPatchError("--no-patch writes the plain export; drop --detector or drop --no-patch")
        if not self.patch and not self.cross_layer:
            raise AtPatchError("--per-layer says how to patch; drop it or drop --no-patch")
        if not self.patch and self.optimize:
            raise AtPatchError("--optimize fuses around the AtPatch nodes of a patched model; drop --no-patch")
        if not self.patch and self.fuse_attention:
            raise AtPatchError("--fuse-attention fuses the AtPatch nodes of a patched model; drop --no-patch")


@dataclass(frozen=True)
class ExportReport:
    output: Path | None
    opset: int
    sites: list[AttentionSite] = field(default_factory=list)
    detector_kind: str | None = None
    export_diffs: dict[str, float] = field(default_factory=dict)
    exporter: str | None = None
    triton: TritonRepository | None = None
    fusion: FusionReport | None = None
    fused: FuseReport | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        if self.exporter:
            diffs = ", ".join(f"{k} max |ONNX - PyTorch| {v:.2g}" for k, v in self.export_diffs.items())
            lines.append(f"exported with {self.exporter} at opset {self.opset}; validated: {diffs}")
        if self.sites:
            heads = sorted({s.heads for s in self.sites if s.heads is not None})
            heads_text = "/".join(map(str, heads)) if heads else "unknown"
            note = " (flags nothing: outputs equal the original; fit one with a debugging set)"
            lines.append(
                f"patched {len(self.sites)} attention layers ({heads_text} heads), ai.onnx opset {self.opset}, "
                f"detector: {self.detector_kind}{note if self.detector_kind == 'pass-through' else ''}"
            )
            for s in self.sites:
                extra = f"  [{'; '.join(s.notes)}]" if s.notes else ""
                lines.append(f"  layer {s.layer:>2}  heads {s.heads or '?':>3}  {s.scope}{extra}")
        if self.fusion is not None:
            lines.append(self.fusion.summary())
        if self.fused is not None:
            lines.append(self.fused.summary())
        lines += [f"note: {n}" for n in self.notes]
        if self.output is not None:
            lines.append(f"wrote {self.output}")
        if self.triton is not None:
            lines.append(self.triton.summary())
        return "\n".join(lines)


def _run_genai_export(options: ExportOptions) -> ExportReport:
    """An onnxruntime-genai folder in, a patched folder out (serving/genai.py)."""
    assert options.model is not None
    ort_only = options.triton is not None or options.optimize or options.fuse_attention
    if options.output is None or ort_only or not options.patch:
        raise AtPatchError(
            f"{options.model} is an onnxruntime-genai folder: give -o NEW_FOLDER only "
            f"(--triton, --optimize, --fuse-attention and --no-patch apply to ONNX files)"
        )
    detector = Detector.load(options.detector) if options.detector else None
    done = patch_genai_folder(options.model, options.output, detector, cross_layer=options.cross_layer)
    return ExportReport(done.output, done.opset, done.sites, done.detector_kind, notes=_dropped(options, detector))


def _dropped(options: ExportOptions, detector: Detector | None) -> list[str]:
    """What --per-layer leaves out of a detector: the parts that act through the cross-layer second pass."""
    if options.cross_layer or not options.patch or detector is None:
        return []
    parts = [
        *(["joint rule over layers"] if detector.joint is not None else []),
        *([f"spread ({detector.spread})"] if detector.spread else []),
        *(["whole words"] if detector.word_pieces is not None else []),
        *(["effect check"] if detector.confirm is not None else []),
    ]
    if not parts:
        return []
    one = len(parts) == 1
    # Calibration switches off layers that separate nothing (threshold NEVER): with all of them off,
    # the joint rule is the whole detector, and the per-layer model flags nothing at all.
    nothing = detector.joint is not None and all(layer.threshold >= NEVER for layer in detector.layers)
    return [
        f"--per-layer patches each layer's own flags only; the detector's {' and '.join(parts)} "
        f"{'acts' if one else 'act'} only through the cross-layer second pass and {'is' if one else 'are'} left "
        f"out (drop --per-layer to keep {'it' if one else 'them'})"
        + ("; every layer of this detector is off, so this model flags nothing" if nothing else "")
    ]


def _words_left_out(options: ExportOptions, detector: Detector | None, model: onnx.ModelProto) -> list[str]:
    """Whole words need token ids that name the key positions (rewrite/positions.py, word_ids)."""
    if not options.cross_layer or detector is None or detector.word_pieces is None:
        return []
    if any(t.name == WORD_PIECES for t in model.graph.initializer):
        return []
    return [
        "the detector patches whole words, which needs an encoder's input_ids at ai.onnx opset 16 or later; "
        "this model has none, so a flagged word piece is patched alone"
    ]


def _opset_of(model: onnx.ModelProto) -> int:
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def run_export(options: ExportOptions) -> ExportReport:
    """Load or export the model, patch it, and write it atomically; the input is never touched."""
    if options.model is not None and is_genai_folder(options.model):
        return _run_genai_export(options)
    output = check_output_path(options.output, options.model, options.detector) if options.output else None
    named_after = options.output or options.model or options.hf
    assert named_after is not None  # checked by ExportOptions
    triton_name = options.triton_name or model_name_for(named_after)
    if options.triton is not None:
        check_target(options.triton, triton_name, options.triton_mount)  # before the export, which can take minutes
        if output is not None and options.triton.resolve() in output.resolve().parents:
            raise AtPatchError(f"-o {output} is inside the --triton folder; write it elsewhere (the model goes in too)")
    detector = Detector.load(options.detector) if options.detector else None
    diffs: dict[str, float] = {}
    exporter = None
    heads = None
    base_dir = None
    family = "bert"
    if options.hf is not None:
        from .exporter import export_hf

        result = export_hf(
            options.hf,
            opset=options.opset,
            dynamo=options.dynamo,
            attention=options.attention,
            with_past=options.with_past,
        )
        model, diffs = result.model, result.max_abs_diff
        heads = getattr(result.config, "num_attention_heads", None)
        family = getattr(result.config, "model_type", family)
        exporter = "torch.onnx dynamo" if options.dynamo else "torch.onnx TorchScript"
    else:
        assert options.model is not None  # checked by ExportOptions
        # Weights stay on disk: the rewrite reads the graph only, and saving streams them across.
        model = load_model(options.model, external_data=False)
        base_dir = options.model.parent
    sites: list[AttentionSite] = []
    kind = None
    if options.patch:
        # ORT's fusions cannot see into the second pass's If: fuse first, then add it.
        model, sites = patch_model(
            model, detector, heads, base_dir, cross_layer=options.cross_layer and not options.optimize
        )
        kind = detector.kind if detector else "pass-through"
    fusion = None
    if options.optimize:
        model, fusion = fuse_for_ort(model, family)
        if options.cross_layer:
            if detector is None:
                add_cross_layer(model)
            else:
                add_cross_layer(model, detector.spread, detector.joint, detector.word_pieces, detector.confirm)
    fused = None
    if options.fuse_attention:
        model, fused = fuse_attention(model)
    if output is not None:
        save_model(model, output, base_dir=base_dir, check=options.patch)
    triton = None
    if options.triton is not None:
        library, why_not = kernel_library(model)
        triton = write_repository(
            model,
            options.triton,
            triton_name,
            library,
            library_note=why_not,
            mount=options.triton_mount,
            base_dir=base_dir,
            check=options.patch,
        )
    notes = _dropped(options, detector) + _words_left_out(options, detector, model)
    return ExportReport(output, _opset_of(model), sites, kind, diffs, exporter, triton, fusion, fused, notes)

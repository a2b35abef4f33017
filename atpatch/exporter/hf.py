"""Hugging Face model folder -> ONNX with eager attention, validated against PyTorch.

torch and transformers are imported here, inside the functions, so `import atpatch`
stays light for deployments that only run patched models.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import AtPatchError, ExportValidationError
from .families import Family, family_for

__all__ = ["ExportResult", "export_hf", "load_hf_model"]

# TorchScript (dynamo=False) exports every family at opsets 17/18 and takes < 1 s for small
# models; dynamo also works (GPT-2 from opset 18) and is 10x slower, so it is opt-in.
DEFAULT_OPSET = 17
# "eager" writes an explicit Softmax per layer; "sdpa" gives the exporter's SDPA lowering (a decomposed
# softmax with a NaN guard, or ONNX Attention with dynamo at opset 23), which the rewrite decomposes.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class ExportResult:
    model: onnx.ModelProto
    family: Family
    max_abs_diff: dict[str, float]  # per output: ONNX Runtime vs PyTorch on random inputs
    folder: Path  # the Hugging Face folder it came from
    config: Any  # its transformers config


def load_hf_model(folder: str | Path, attention: str = "eager") -> Any:
    """The model in `folder` with `attention` ("eager": explicit softmax, or "sdpa"), in eval mode, offline."""
    try:
        import transformers
    except ImportError as err:
        raise AtPatchError(
            "exporting needs torch and transformers: pip install -c constraints.txt 'atpatch[export]'"
        ) from err
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise AtPatchError(f"unknown attention implementation {attention!r}; use one of {ATTENTION_IMPLEMENTATIONS}")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AtPatchError(
            f"{folder} is not a Hugging Face model folder (no config.json); pass the folder of save_pretrained"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls or transformers.AutoModel
    try:
        model = cls.from_pretrained(folder, attn_implementation=attention, local_files_only=True)
    except (OSError, ValueError) as err:
        raise AtPatchError(
            f"cannot load the model in {folder} ({str(err).splitlines()[0]}); check the folder's weights"
        ) from err
    return model.eval()


def _keyword_forward(model: Any, input_names: tuple[str, ...], kwargs: dict[str, Any]) -> Any:
    """transformers 5 takes keyword inputs; the exporter passes positional ones."""
    import torch

    class KeywordForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(input_names, args, strict=True)), **kwargs)[0]

    return KeywordForward().eval()


def _first_output_name(model: Any, family: Family, inputs: dict[str, np.ndarray]) -> str:
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **family.forward_kwargs)
    return next(iter(out.keys()))


def _check_dynamo_opset(family: Family, opset: int, with_past: bool) -> None:
    """Refuse the dynamo/opset pairs whose graphs onnxruntime rejects, naming a setting that works."""
    if opset < family.dynamo_min_opset:
        raise AtPatchError(
            f"the dynamo exporter makes {family.name} graphs that onnxruntime rejects below opset "
            f"{family.dynamo_min_opset}; use --opset {family.dynamo_min_opset} or the default TorchScript exporter"
        )
    # The generation step takes position_ids with a batch axis, so its rotary cos/sin are not fixed to batch 1.
    if family.dynamo_max_opset is not None and opset > family.dynamo_max_opset and not with_past:
        raise AtPatchError(
            f"the dynamo exporter makes {family.name} graphs that onnxruntime rejects above opset "
            f"{family.dynamo_max_opset} (a RotaryEmbedding that runs only at batch 1); use --opset 18, "
            f"--with-past, or the default TorchScript exporter"
        )


def _to_onnx(
    wrapper: Any, args: tuple[Any, ...], family: Family, output: str, opset: int, dynamo: bool
) -> onnx.ModelProto:
    import torch

    names = list(family.input_names)
    if dynamo:
        dim = torch.export.Dim.DYNAMIC
        shapes = {n: {axis: dim for axis in axes} for n, axes in family.dynamic_axes.items()}
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=[output],
            dynamic_shapes=(tuple(shapes.values()),),
            optimize=True,
        )
        assert program is not None  # dynamo=True always returns the program
        return program.model_proto
    buffer = io.BytesIO()
    torch.onnx.export(
        wrapper,
        args,
        buffer,  # type: ignore[arg-type]  # file objects are accepted
        dynamo=False,
        opset_version=opset,
        input_names=names,
        output_names=[output],
        dynamic_axes={**family.dynamic_axes, output: {0: "batch"}},
    )
    return onnx.load_from_string(buffer.getvalue())


def validate(model: Any, onnx_model: onnx.ModelProto, family: Family, output: str, seed: int = 0) -> dict[str, float]:
    """Run PyTorch and ONNX Runtime on fresh random inputs; raise past the family's tolerance."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    # A different batch and length from the export's example, so dynamic axes are exercised.
    inputs = family.make_inputs(model.config, 3, 11, rng)
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **family.forward_kwargs)[0].numpy()
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run([output], inputs)
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if expected.size else 0.0
    if not diff <= family.atol:  # also catches NaN
        raise ExportValidationError(
            f"ONNX output {output!r} differs from PyTorch by {diff:.3g} (tolerance {family.atol:g}); "
            f"try the other exporter (--dynamo / default) or another opset"
        )
    return {output: diff}


def export_hf(
    folder: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = False,
    seed: int = 0,
    attention: str = "eager",
    with_past: bool = False,
) -> ExportResult:
    """Export the model in `folder` to ONNX (`attention` implementation, dynamic axes) and validate it.

    `with_past` exports a causal LM as one generation step with its KV cache (see kv_cache.py).
    """
    import torch

    model = load_hf_model(folder, attention)
    try:
        family = family_for(model.config.model_type)
    except ValueError as err:
        raise AtPatchError(str(err)) from err
    if dynamo:
        _check_dynamo_opset(family, opset, with_past)
    if with_past:
        from .kv_cache import export_with_past, validate_with_past

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the validation checks other shapes for real
            onnx_model = export_with_past(model, family, opset, dynamo, seed)
        diffs = validate_with_past(model, onnx_model, family, seed=seed + 1)
        return ExportResult(onnx_model, family, diffs, Path(folder), model.config)
    example = family.make_inputs(model.config, 2, 8, np.random.default_rng(seed))
    output = _first_output_name(model, family, example)
    wrapper = _keyword_forward(model, family.input_names, family.forward_kwargs)
    args = tuple(torch.from_numpy(example[n]) for n in family.input_names)
    # The tracer's warnings are about Python control flow on shapes, which the
    # validation below checks for real on a different batch size and length.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_model = _to_onnx(wrapper, args, family, output, opset, dynamo)
        except Exception as err:  # noqa: BLE001 - torch.onnx raises many types; the user needs one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AtPatchError(
                f"torch.onnx could not export {family.name} at opset {opset} ({first}); use --opset 17 (the default) "
                f"or 18{'' if dynamo else ', or --dynamo'}"
            ) from err
    diffs = validate(model, onnx_model, family, output, seed=seed + 1)
    return ExportResult(onnx_model, family, diffs, Path(folder), model.config)

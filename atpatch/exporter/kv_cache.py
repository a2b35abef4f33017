"""A causal LM -> one ONNX generation step with its KV cache as inputs and outputs, validated.

The layout is in `families.py` (STEP_INPUT_NAMES, CacheLayout). One graph serves the prefill
(an empty cache) and every decode step, so the rewrite patches each layer's softmax once and
the patch applies to the [B, H, S, past + S] map of whichever step runs.
torch and transformers are imported inside the functions, as in `hf.py`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnx

from ..errors import AtPatchError, ExportValidationError
from .families import STEP_INPUT_NAMES, CacheLayout, Family, cache_layout, step_inputs

__all__ = ["export_with_past", "generation_step", "validate_with_past"]


def generation_step(model: Any, layout: CacheLayout) -> Any:
    """The model as a module of flat tensors: (ids, mask, positions, *past) -> (logits, *present)."""
    import torch
    from transformers.cache_utils import DynamicCache

    class GenerationStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layout.layers)]
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=DynamicCache(ddp_cache_data=pairs),
                use_cache=True,
            )
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return GenerationStep().eval()


def _torch_step(module: Any, inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [t.numpy() for t in module(*(torch.from_numpy(inputs[n]) for n in names))]


def export_with_past(model: Any, family: Family, opset: int, dynamo: bool, seed: int = 0) -> onnx.ModelProto:
    """Export one generation step of `model` (a transformers causal LM) and validate it."""
    import torch

    if not family.generates:
        raise AtPatchError(f"--with-past exports causal LMs for generation; a {family.name} does not generate")
    layout = cache_layout(model.config)
    names = [*STEP_INPUT_NAMES, *layout.past_names]
    outputs = ["logits", *layout.present_names]
    # A cache of 5 tokens and 3 new ones: past and sequence lengths must differ for the tracer to keep them apart.
    example = step_inputs(model.config, 2, 3, 5, np.random.default_rng(seed))
    args = tuple(torch.from_numpy(example[n]) for n in names)
    module = generation_step(model, layout)
    if dynamo:
        dim = torch.export.Dim.DYNAMIC  # Dim arithmetic (past + seq) is not supported: every axis its own
        past_shapes = tuple({0: dim, 2: dim} for _ in layout.past_names)
        shapes = ({0: dim, 1: dim}, {0: dim, 1: dim}, {0: dim, 1: dim}, past_shapes)
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=shapes,
            optimize=True,
        )
        assert program is not None  # dynamo=True always returns the program
        onnx_model = program.model_proto
    else:
        axes: dict[str, dict[int, str]] = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        }
        axes.update({n: {0: "batch", 2: "past_sequence"} for n in layout.past_names})
        axes.update({n: {0: "batch", 2: "total_sequence"} for n in layout.present_names})
        buffer = io.BytesIO()
        torch.onnx.export(
            module,
            args,
            buffer,  # type: ignore[arg-type]  # file objects are accepted
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
        )
        onnx_model = onnx.load_from_string(buffer.getvalue())
    return onnx_model


def _real_positions(output: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Which positions of `output` hold real tokens: a padded position's logits and cache are undefined.

    (Their attention rows are fully masked; eager softmax makes them uniform, a decomposed SDPA zero.)
    """
    mask = inputs["attention_mask"].astype(bool)
    if output == "logits":
        return mask[:, mask.shape[1] - inputs["input_ids"].shape[1] :]
    return mask


def validate_with_past(model: Any, onnx_model: onnx.ModelProto, family: Family, seed: int = 0) -> dict[str, float]:
    """ONNX Runtime vs PyTorch on a prefill (empty cache) and a decode step, both padded batches of 3.

    Returns the largest difference per output over real (unpadded) positions; raises past the tolerance.
    """
    import onnxruntime as ort

    layout = cache_layout(model.config)
    names = [*STEP_INPUT_NAMES, *layout.past_names]
    outputs = ["logits", *layout.present_names]
    module = generation_step(model, layout)
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    diffs = dict.fromkeys(outputs, 0.0)
    for past, seq in ((0, 11), (9, 1)):  # the prefill, then one decode step
        inputs = step_inputs(model.config, 3, seq, past, rng)
        try:
            got = session.run(outputs, inputs)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise ExportValidationError(
                f"onnxruntime cannot run the exported generation step (cache of {past}, {seq} new tokens): "
                f"{str(err).splitlines()[0]}"
            ) from err
        expected = _torch_step(module, inputs, names)
        for name, g, e in zip(outputs, got, expected, strict=True):
            real = _real_positions(name, inputs)
            # Move the position axis first, so one boolean index picks real positions of any output.
            g, e = (np.moveaxis(x, 2, 1) if x.ndim == 4 else x for x in (g, e))
            diff = float(np.max(np.abs(g[real].astype(np.float64) - e[real]))) if real.any() else 0.0
            diffs[name] = float(np.max([diffs[name], diff]))  # keeps a NaN
    for name, diff in diffs.items():
        if not diff <= family.atol:  # also catches NaN
            raise ExportValidationError(
                f"ONNX output {name!r} differs from PyTorch by {diff:.3g} (tolerance {family.atol:g}); "
                f"try the other exporter (--dynamo / default) or another opset"
            )
    return diffs

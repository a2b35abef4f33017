"""What the exporter must know per model family, declared once per family.

A family says which inputs its models take, how to make valid random ones for
validation, and which axes are dynamic. Add a family by adding one `Family` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FAMILIES", "Family", "family_for"]

Inputs = dict[str, np.ndarray]


def _text_inputs(config: Any, batch: int, seq: int, rng: np.random.Generator) -> Inputs:
    ids = rng.integers(0, config.vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[-1, seq - seq // 3 :] = 0  # a padded row, so validation covers masking
    return {"input_ids": ids, "attention_mask": mask}


def _image_inputs(config: Any, batch: int, seq: int, rng: np.random.Generator) -> Inputs:
    del seq  # the patch grid fixes the sequence length
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    make_inputs: Callable[[Any, int, int, np.random.Generator], Inputs]
    dynamic_axes: dict[str, dict[int, str]]
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    atol: float = 1e-4
    # dynamo at opset 17 keeps an opset-18 Split for GPT-2, which onnxruntime rejects.
    dynamo_min_opset: int = 17

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.dynamic_axes)


TEXT_ENCODER = Family(
    name="text encoder",
    model_types=("bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert", "mpnet"),
    make_inputs=_text_inputs,
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
)
VISION_ENCODER = Family(
    name="vision encoder",
    model_types=("vit", "deit"),
    make_inputs=_image_inputs,
    dynamic_axes={"pixel_values": {0: "batch"}},
)
DECODER = Family(
    name="causal decoder",
    model_types=("gpt2", "llama", "mistral", "qwen2"),
    make_inputs=_text_inputs,
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
    forward_kwargs={"use_cache": False},
    dynamo_min_opset=18,
)
FAMILIES = (TEXT_ENCODER, VISION_ENCODER, DECODER)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model type {model_type!r} has no export recipe; supported: {known}")

"""What the exporter must know per model family, declared once per family.

A family says which inputs its models take, how to make valid random ones for
validation, and which axes are dynamic. Add a family by adding one `Family` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FAMILIES", "CacheLayout", "Family", "cache_layout", "family_for", "positions", "step_inputs"]

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
    # dynamo from opset 23 writes Llama's rotary embedding as one RotaryEmbedding op whose cos/sin
    # keep the example's batch of 1 (no position_ids input); onnxruntime rejects any other batch.
    # Exports with the KV cache take position_ids per row and are not limited.
    dynamo_max_opset: int | None = None
    # A causal LM that can be exported for generation: one step with its KV cache (`with_past`).
    generates: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.dynamic_axes)


TEXT_ENCODER = Family(
    name="text encoder",
    model_types=(
        "bert",
        "roberta",
        "distilbert",
        "electra",
        "xlm-roberta",
        "camembert",
        "mpnet",
        "albert",
        "deberta",
        "deberta-v2",
        "ernie",
        "roformer",
        "data2vec-text",
        "modernbert",
    ),
    make_inputs=_text_inputs,
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
)
VISION_ENCODER = Family(
    name="vision encoder",
    model_types=("vit", "deit", "beit", "data2vec-vision", "dinov2"),
    make_inputs=_image_inputs,
    dynamic_axes={"pixel_values": {0: "batch"}},
)
GPT2_DECODER = Family(
    name="GPT-2 causal decoder",
    model_types=("gpt2",),
    make_inputs=_text_inputs,
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
    forward_kwargs={"use_cache": False},
    dynamo_min_opset=18,
    generates=True,
)
LLAMA_DECODER = Family(
    name="Llama-style causal decoder",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi"),
    make_inputs=_text_inputs,
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
    forward_kwargs={"use_cache": False},
    dynamo_max_opset=22,
    generates=True,
)
FAMILIES = (TEXT_ENCODER, VISION_ENCODER, GPT2_DECODER, LLAMA_DECODER)


# --- Decoders exported for generation: one step, KV cache in and out -------------------------------
#
# Inputs: input_ids [B, S], attention_mask [B, past + S], position_ids [B, S], and per layer
# past_key_values.{i}.key/.value [B, kv_heads, past, head_dim]; outputs: logits [B, S, vocab] and
# present.{i}.key/.value [B, kv_heads, past + S, head_dim]. The same graph runs the prefill (past = 0)
# and every decode step (S = 1, attention maps [B, H, 1, past + 1]). position_ids is an input so a
# left-padded batch gets the positions generate() gives it (cumsum of the mask - 1).
STEP_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class CacheLayout:
    """The shape of a decoder's KV cache: per layer a key and a value [B, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int  # fewer than the attention heads with grouped-query attention
    head_dim: int

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]


def cache_layout(config: Any) -> CacheLayout:
    heads = config.num_attention_heads
    return CacheLayout(
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def positions(mask: np.ndarray) -> np.ndarray:
    """generate()'s position ids for a padded batch: the count of real tokens before each one (pads: 0)."""
    return np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


def step_inputs(config: Any, batch: int, seq: int, past: int, rng: np.random.Generator) -> Inputs:
    """Random inputs for one step after `past` cached tokens; with batch > 1 the last row is left-padded."""
    layout = cache_layout(config)
    mask = np.ones((batch, past + seq), dtype=np.int64)
    if batch > 1:
        mask[-1, : (past + seq) // 3] = 0
    inputs = {
        "input_ids": rng.integers(0, config.vocab_size, size=(batch, seq), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": positions(mask)[:, past:],
    }
    shape = (batch, layout.kv_heads, past, layout.head_dim)
    inputs.update({n: rng.standard_normal(shape).astype(np.float32) for n in layout.past_names})
    return inputs


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model type {model_type!r} has no export recipe; supported: {known}")

"""Greedy generation through onnxruntime with a decoder exported with its KV cache (no torch).

The model is one generation step (`atpatch-export --hf DIR --with-past`): input_ids,
attention_mask, position_ids and past_key_values.{i}.key/.value in; logits and
present.{i}.key/.value out. The prefill runs it with an empty cache, each decode step with one
new token, so a patched model's AtPatch nodes see every step's [B, H, 1, past + 1] map. A patched
model also carries the positions flagged so far (`past_atpatch_flags` in, `present_atpatch_flags`
out), which are patched in every layer of every later step; they are fed back like the cache.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import AtPatchError
from ..exporter.families import STEP_INPUT_NAMES, positions
from ..rewrite.crosslayer import PAST_FLAGS, PRESENT_FLAGS

__all__ = ["greedy_generate", "left_pad"]

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens moved to the end (pads first), as generation needs: new tokens follow them."""
    ids, mask = np.zeros_like(input_ids), np.zeros_like(attention_mask)
    for row in range(ids.shape[0]):
        real = attention_mask[row] == 1
        n = int(real.sum())
        if n:
            ids[row, -n:] = input_ids[row, real]
            mask[row, -n:] = 1
    return ids, mask


def _empty_cache(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    cache = {}
    state = [v for v in session.get_overridable_initializers() if v.name == PAST_FLAGS]  # fed like an input
    for value in [*session.get_inputs(), *state]:
        if value.name in STEP_INPUT_NAMES:
            continue
        if value.name == PAST_FLAGS:  # nothing flagged before the prompt
            cache[value.name] = np.zeros((batch, 0), np.bool_)
            continue
        if not value.name.startswith("past_key_values.") or len(value.shape) != 4:
            raise AtPatchError(
                f"the model takes {value.name!r}, not a generation step's input; "
                f"export it with atpatch-export --hf DIR --with-past"
            )
        heads, head_dim = value.shape[1], value.shape[3]
        if not (isinstance(heads, int) and isinstance(head_dim, int)) or value.type not in _DTYPES:
            raise AtPatchError(f"cannot tell the cache's layout from {value.name} {value.type} {value.shape}")
        cache[value.name] = np.zeros((batch, heads, 0, head_dim), _DTYPES[value.type])
    return cache


def greedy_generate(
    session: ort.InferenceSession,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    max_new_tokens: int = 8,
) -> np.ndarray:
    """The next `max_new_tokens` tokens of each row by greedy decoding: [batch, max_new_tokens] int64.

    Padding may be on either side (1 = real token in `attention_mask`); rows are left-padded first.
    """
    names = {value.name for value in session.get_inputs()}
    missing = [n for n in STEP_INPUT_NAMES if n not in names]
    if missing or not any(n.startswith("past_key_values.") for n in names):
        raise AtPatchError(
            f"the model is not a generation step with a KV cache (no {', '.join(missing) or 'past_key_values'} "
            f"input); export it with atpatch-export --hf DIR --with-past"
        )
    if max_new_tokens < 1:
        raise AtPatchError(f"max_new_tokens is {max_new_tokens}; ask for at least 1")
    input_ids = np.asarray(input_ids, np.int64)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != input_ids.shape or not mask.any(axis=1).all():
        raise AtPatchError("attention_mask must have input_ids' shape and at least one real token per row")
    ids, mask = left_pad(input_ids, mask)
    cache = _empty_cache(session, ids.shape[0])
    past_names = list(cache)
    present_names = [
        PRESENT_FLAGS if n == PAST_FLAGS else n.replace("past_key_values.", "present.", 1) for n in past_names
    ]
    position = positions(mask)
    generated = []
    for _ in range(max_new_tokens):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position, **cache}
        logits, *present = session.run(["logits", *present_names], feeds)
        ids = logits[:, -1].argmax(axis=-1).astype(np.int64)[:, None]
        generated.append(ids)
        cache = dict(zip(past_names, present, strict=True))
        position = position[:, -1:] + 1
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return np.concatenate(generated, axis=1)

"""Graph pieces over key positions ([batch, k_len] tensors) that know a sequence from a patch grid.

A grid map holds `lead` special positions ([CLS], a distillation token) before G x G patches, with
G = floor(sqrt(K)) (ops/joint.py, grid_lead); anything else is a sequence.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto

from ..ops.builder import NodeBuilder
from ..ops.joint import JointRule
from ..ops.words import CONTINUES, SPECIAL

__all__ = ["WORD_PIECES", "is_patch_grid", "joint_flags", "joint_score", "spread", "whole_words", "word_ids"]

WORD_PIECES = "atpatch/word_pieces"  # initializer: uint8 [vocab], ops/words.py's table (bool before its codes)
_WORDS_OPSET = 16  # ScatterElements with reduction="add"

_END = np.iinfo(np.int64).max


def is_patch_grid(input_names: Collection[str]) -> bool:
    """Whether a model's key positions form an image's patch grid: it takes `pixel_values`."""
    return "pixel_values" in input_names


def _lead(b: NodeBuilder, keys: str) -> tuple[str, str]:
    """(side G, lead K - G^2) from the key count `keys` (int64, [1] or scalar); built once per `keys` and builder."""

    def make() -> tuple[str, str]:
        side = b.op("Cast", b.op("Floor", b.op("Sqrt", b.to_float(keys))), to=TensorProto.INT64)
        return side, b.op("Sub", keys, b.op("Mul", side, side))

    return b.once(("lead", keys), make)


def _keys(b: NodeBuilder, like: str) -> str:
    """The key count K (int64 [1]) of a [B, K] tensor; built once per `like` and builder."""

    def make() -> str:
        return b.op("Slice", b.op("Shape", like), b.const([1], np.int64), b.const([2], np.int64))

    return b.once(("keys", like), make)


def _grid(b: NodeBuilder, x: str, like: str | None = None) -> tuple[str, str, str, str]:
    """(keys, side, lead, patches [B, G, G]) of a [B, K] tensor; K, G and the lead read off `like`
    (a [B, K] tensor of the same shape, default `x`), once per `like`."""
    keys = _keys(b, like or x)
    side, lead = _lead(b, keys)
    patches = b.op("Slice", x, lead, keys, b.const([1], np.int64))
    image = b.op("Reshape", patches, b.op("Concat", b.const([-1], np.int64), side, side, axis=0))
    return keys, side, lead, image


def spread(b: NodeBuilder, flags: str, radius: int, grid: bool) -> str:
    """`flags` [B, K] widened by `radius` positions: along the sequence, or over the patch grid (its
    special positions are left as they are)."""
    size = 2 * radius + 1
    x = b.to_float(flags)
    if not grid:
        pooled = b.op("MaxPool", b.op("Unsqueeze", x, b.const([1], np.int64)), kernel_shape=[size], pads=[radius] * 2)
        return b.op("Cast", b.op("Squeeze", pooled, b.const([1], np.int64)), to=TensorProto.BOOL)
    keys, _, lead, image = _grid(b, x)
    head = b.op("Slice", x, b.const([0], np.int64), lead, b.const([1], np.int64))
    pooled = b.op(
        "MaxPool", b.op("Unsqueeze", image, b.const([1], np.int64)), kernel_shape=[size, size], pads=[radius] * 4
    )
    back = b.op("Reshape", pooled, b.const([0, -1], np.int64))
    return b.op("Cast", b.op("Concat", head, back, axis=1), to=TensorProto.BOOL)


def _slice(b: NodeBuilder, x: str, starts: list[int], ends: list[int], axes: list[int]) -> str:
    return b.op("Slice", x, b.const(starts, np.int64), b.const(ends, np.int64), b.const(axes, np.int64))


def _best_window(b: NodeBuilder, x: str, grid: bool, like: str) -> str:
    """ops/joint.py's pool, in the same float32 order: each position's best window mean (`like`: _grid)."""
    minus_inf = b.const(-np.inf)
    if not grid:
        win = b.op("Div", b.op("Add", _slice(b, x, [0], [-1], [1]), _slice(b, x, [1], [_END], [1])), b.const(2.0))
        left = b.op("Pad", win, b.const([0, 1, 0, 0], np.int64), minus_inf)
        right = b.op("Pad", win, b.const([0, 0, 0, 1], np.int64), minus_inf)
        return b.op("Max", left, right)
    _, _, lead, g = _grid(b, x, like)
    total = b.op("Add", _slice(b, g, [0, 0], [-1, -1], [1, 2]), _slice(b, g, [1, 0], [_END, -1], [1, 2]))
    total = b.op("Add", total, _slice(b, g, [0, 1], [-1, _END], [1, 2]))
    total = b.op("Add", total, _slice(b, g, [1, 1], [_END, _END], [1, 2]))
    pad = b.op("Pad", b.op("Div", total, b.const(4.0)), b.const([0, 1, 1, 0, 1, 1], np.int64), minus_inf)
    shifts = [
        _slice(b, pad, [1, 1], [_END, _END], [1, 2]),
        _slice(b, pad, [0, 1], [-1, _END], [1, 2]),
        _slice(b, pad, [1, 0], [_END, -1], [1, 2]),
        _slice(b, pad, [0, 0], [-1, -1], [1, 2]),
    ]
    best = b.op("Reshape", b.op("Max", *shifts), b.const([0, -1], np.int64))
    head = b.op("Slice", x, b.const([0], np.int64), lead, b.const([1], np.int64))
    return b.op("Concat", head, best, axis=1)


def joint_flags(b: NodeBuilder, scores: list[str], rule: JointRule, grid: bool) -> str:
    """bool [B, K]: the positions `rule` flags (ops/joint.py) from the layers' `scores` outputs."""
    return b.op("Greater", joint_score(b, scores, rule, grid), b.const(np.float32(rule.threshold)))


def joint_score(b: NodeBuilder, scores: list[str], rule: JointRule, grid: bool) -> str:
    """float [B, K]: ops/joint.py's joint_scores (-inf where the rule never flags). What two rules over
    the same `scores` share (the key count and grid, the weighted sum when their weights are equal, the
    positions no rule flags) is built once per builder: the joint rule and the effect check both run
    on every input."""

    def weighted() -> str:
        total = None
        for name, weight in zip(scores, rule.weights, strict=True):
            if weight > 0:  # a left-out layer would turn -inf (unattended) into NaN
                term = b.op("Mul", name, b.const(np.float32(weight)))
                total = term if total is None else b.op("Add", total, term)
        assert total is not None  # JointRule has a positive weight
        return total

    def never() -> str:  # bool [K]: sinks, [CLS]
        keys = _keys(b, scores[0])
        lead = _lead(b, keys)[1] if grid else b.const(1, np.int64)
        position = b.op("Range", b.const(0, np.int64), b.op("Squeeze", keys), b.const(1, np.int64))
        return b.op("Less", position, lead)

    total = b.once(("weighted", tuple(scores), rule.weights), weighted)
    if rule.window == 2:
        total = b.once(("window", total, grid), lambda: _best_window(b, total, grid, scores[0]))
    masked = b.once(("never", scores[0], grid), never)
    return b.once(("joint", total), lambda: b.op("Where", masked, b.const(-np.inf), total))


def word_ids(graph: onnx.GraphProto, opset: int, decoder: bool) -> str | None:
    """The input whose token ids name the key positions, where whole words can be taken: an encoder's
    `input_ids` (a decoder's keys include its cache), at opset 16 or later; else None."""
    names = {value.name for value in graph.input}
    return "input_ids" if "input_ids" in names and not decoder and opset >= _WORDS_OPSET else None


def whole_words(b: NodeBuilder, flags: str, ids: str, vocab: int) -> str:
    """ops/words.py's whole_words: `flags` [B, K] widened so that a flagged piece flags its word, from
    the token ids `ids` [B, K] and the WORD_PIECES table of `vocab` entries (the caller adds it to the
    graph). Ids past the table (a model's embedding may be larger than its tokenizer's vocabulary)
    read its last entry rather than fail the run."""
    known = b.op("Min", ids, b.const(vocab - 1, np.int64))
    code = b.op("Cast", b.op("Gather", WORD_PIECES, known), to=TensorProto.INT64)
    starts = b.op("Cast", b.op("Not", b.op("Equal", code, b.const(CONTINUES, np.int64))), to=TensorProto.INT64)
    # The piece after a special token starts a word: `special` shifted one position right.
    special = b.op("Cast", b.op("Equal", code, b.const(SPECIAL, np.int64)), to=TensorProto.INT64)
    at_0, at_1 = b.const([0], np.int64), b.const([1], np.int64)
    first = b.op("Mul", b.op("Slice", special, at_0, at_1, at_1), b.const(0, np.int64))  # zeros [B, 1]
    before = b.op("Slice", special, at_0, b.const([-1], np.int64), at_1)
    starts = b.op("Max", starts, b.op("Concat", first, before, axis=1))
    one = b.const(1, np.int64)
    word = b.op("Max", b.op("Sub", b.op("CumSum", starts, one), one), b.const(0, np.int64))  # [B, K] word index
    x = b.to_float(flags)
    per_word = b.op("ScatterElements", b.op("Mul", x, b.const(0.0)), word, x, axis=1, reduction="add")
    return b.op("Greater", b.op("GatherElements", per_word, word, axis=1), b.const(0.0))

"""Random attention maps and detectors for op tests (fresh each run, never all-zeros)."""

from __future__ import annotations

import numpy as np

from atpatch.ops import reference, spec

MASKS = ("none", "padded", "causal")
# Op v2 also tells real query rows from padding ones. "padded" already has padding rows when
# q_len == k_len (BERT: padded keys masked in every row, padded queries still attend the real
# keys); "padded_rows" zeroes the padded query rows too, as some exporters do.
MASKS_V2 = (*MASKS, "padded_rows")
FORCED_KINDS = ("none", "[B,K]", "[B,1]", "[1,K]", "[1,1]")


def random_map(rng: np.random.Generator, shape: tuple[int, int, int, int], mask: str) -> np.ndarray:
    """Softmax of random scores, with an over-attended column sometimes, and masked entries exactly 0."""
    b, h, q, k = shape
    scores = rng.normal(size=shape) * rng.uniform(0.5, 4.0)
    if k > 1 and rng.random() < 0.5:
        scores[..., rng.integers(k)] += rng.uniform(2.0, 8.0)  # a column that soaks up attention
    allowed = np.ones(shape, dtype=bool)
    if mask == "padded":
        for i in range(b):
            allowed[i, ..., k - int(rng.integers(0, k)) :] = False  # keeps >= 1 key
    elif mask == "causal":
        allowed &= np.tril(np.ones((q, k), dtype=bool), k=k - q)[None, None]
        allowed[..., 0] = True  # a query with no visible key would be a fully masked row
    elif mask == "padded_rows":
        for i in range(b):
            allowed[i, ..., k - int(rng.integers(0, k)) :] = False
    scores = np.where(allowed, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)
    if mask == "padded_rows":
        for i in range(b):
            probs[i, :, q - int(rng.integers(0, q)) :] = 0.0  # keeps >= 1 row; all-zero rows are padding
    return probs


def random_forced(rng: np.random.Generator, batch: int, k_len: int, kind: str) -> np.ndarray | None:
    """A random `forced` mask of shape `kind` (FORCED_KINDS; None for "none"), ~20% positions set."""
    if kind == "none":
        return None
    shape = {"[B,K]": (batch, k_len), "[B,1]": (batch, 1), "[1,K]": (1, k_len), "[1,1]": (1, 1)}[kind]
    return rng.random(shape) < 0.2


def pad_batch_item(rng: np.random.Generator, attention: np.ndarray, length: int) -> np.ndarray:
    """A self-attention map [1, heads, n, n] padded BERT-style to [1, heads, length, length].

    The padded keys are masked in every row; the padded query rows attend the real keys (a
    random softmax over them), as a padded token's query does in BERT.
    """
    _, h, n, k = attention.shape
    assert n == k <= length, attention.shape
    out = np.zeros((1, h, length, length), attention.dtype)
    out[:, :, :n, :n] = attention
    pad = np.exp(rng.normal(size=(1, h, length - n, n)))
    out[:, :, n:, :n] = (pad / pad.sum(-1, keepdims=True)).astype(attention.dtype)
    return out


def random_detector(rng: np.random.Generator, heads: int) -> reference.LayerDetector:
    """A random detector for maps with `heads` heads."""
    hidden = int(rng.integers(1, 9))
    return reference.LayerDetector(
        w1=rng.normal(size=(spec.num_features(heads), hidden)).astype(np.float32),
        b1=rng.normal(size=hidden).astype(np.float32),
        w2=rng.normal(size=hidden).astype(np.float32),
        b2=np.zeros(1, np.float32),
        threshold=0.0,
    )


def with_flags(
    attention: np.ndarray, detector: reference.LayerDetector, how: str, rng: np.random.Generator
) -> reference.LayerDetector | None:
    """`detector` with b2 shifted so that `how` ("none", "one", "some", "all") columns are flagged.

    The cut is placed in a gap of the reference's scores wider than 1e-3, so float rounding in
    another implementation cannot flip a flag; None when the scores leave no such gap.
    """
    scores = np.sort(np.unique(reference.column_scores(attention, detector).ravel()))[::-1]
    if how == "none":
        cut = scores[0] + 1.0
    elif how == "all":
        cut = scores[-1] - 1.0
    else:
        gaps = scores[:-1] - scores[1:]
        candidates = [0] if how == "one" else list(range(len(gaps)))
        candidates = [i for i in candidates if i < len(gaps) and gaps[i] > 1e-3]
        if not candidates:
            return None
        i = int(rng.choice(candidates))
        cut = (scores[i] + scores[i + 1]) / 2
    return reference.LayerDetector(
        detector.w1, detector.b1, detector.w2, (detector.b2 - np.float32(cut)).astype(np.float32), 0.0
    )

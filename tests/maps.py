"""Random attention maps and detectors for op tests (fresh each run, never all-zeros)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

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


def unchanged_rows(attention: np.ndarray, patched_columns: np.ndarray) -> np.ndarray:
    """Rows the spec returns bit-identical: no unmasked entry in P ([batch, k_len]), or all of them."""
    valid = attention.astype(np.float32) > 0
    hit = valid & patched_columns[:, None, None, :]
    return ~(hit.any(-1) & (valid & ~hit).any(-1))


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


def op_feeds(
    attention: np.ndarray, d: reference.LayerDetector, forced: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The op's inputs; `forced` None: nothing forced (all false, [batch, k_len])."""
    if forced is None:
        forced = np.zeros((attention.shape[0], attention.shape[3]), bool)
    return {"attention": attention, "w1": d.w1, "b1": d.b1, "w2": d.w2, "b2": d.b2, "forced": forced}


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


def detector_flagging(
    rng: np.random.Generator, attention: np.ndarray, how: str, draws: int = 50
) -> reference.LayerDetector:
    """A random detector that flags `how` columns of `attention`, redrawn while the draw cannot.

    A small random detector can be dead on a map (every hidden unit's ReLU at 0, so every column
    scores the same): no cut then separates "some" columns from the others.
    """
    for _ in range(draws):
        d = with_flags(attention, random_detector(rng, attention.shape[1]), how, rng)
        if d is not None:
            return d
    raise AssertionError(f"no random detector in {draws} draws flags {how!r} columns of a map {attention.shape}")


# Op v1 (models patched before v2): every query row counted, and the first three features only.
V1_FEATURES_PER_HEAD = 3


def random_detector_v1(rng: np.random.Generator, heads: int) -> reference.LayerDetector:
    """A random detector for op v1 maps with `heads` heads: w1 [3 * heads, hidden]."""
    d = random_detector(rng, heads)
    return reference.LayerDetector(
        np.ascontiguousarray(d.w1[: V1_FEATURES_PER_HEAD * heads]), d.b1, d.w2, d.b2, d.threshold
    )


@contextlib.contextmanager
def v1_reference() -> Iterator[None]:
    """The numpy reference as op v1: every query row real, the first three features of each head.

    (v1's output does not depend on v2's "attended" condition, as an unattended column has no
    unmasked entry to patch.)
    """
    v2_features = reference.column_features

    def v1_features(attention: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(v2_features(attention)[..., : V1_FEATURES_PER_HEAD * np.shape(attention)[1]])

    every_row = mock.patch.object(reference, "real_queries", lambda a: np.ones(np.shape(a)[:3], dtype=bool))
    with every_row, mock.patch.object(reference, "column_features", v1_features):
        yield


def own_row_map(dtype: type = np.float32) -> tuple[np.ndarray, reference.LayerDetector, np.ndarray]:
    """A map where only the own-row features tell the query keys apart, a detector reading `self` of
    head 0 alone, and the flags it must give ([batch, k_len]); the CUDA self-test's own_row_case.

    [2, 2, 7, 9]: two cache keys get 0.05 in every row; row o of head h gives query key 2 + k the
    value p[(k + o + h) % 7] * 0.9, p = (1..7) / 28 (reversed in item 1). Every query key receives
    the same values and every row has the same ones, so mass, peak, top, opeak and ofocus are equal
    across the query keys; self (key 2 + o: p[(2 o + h) % 7] * 0.9 * 9) is not. Flagged: the query
    keys whose self of head 0 is above 1.0, written out by hand.
    """
    b, h, q, k = 2, 2, 7, 9
    cache = k - q
    p = np.arange(1, q + 1, dtype=np.float32) / np.float32(28)
    a = np.empty((b, h, q, k), np.float32)
    a[..., :cache] = 0.05
    for item in range(b):
        values = p if item == 0 else p[::-1]
        for head in range(h):
            for o in range(q):
                a[item, head, o, cache:] = values[(np.arange(q) + o + head) % q] * np.float32(0.9)
    w1 = np.zeros((spec.num_features(h), 1), np.float32)
    w1[spec.FEATURE_NAMES.index("self") * h + 0, 0] = 1.0
    d = reference.LayerDetector(w1, np.zeros(1, np.float32), np.ones(1, np.float32), np.full(1, -1.0, np.float32), 0.0)
    # self of head 0 at key 2 + o: item 0 (2 o % 7 + 1) / 28 * 8.1, above 1 for 2 o % 7 >= 3, so
    # o = 2, 3, 5, 6; item 1 (7 - 2 o % 7) / 28 * 8.1, above 1 for 2 o % 7 <= 3, so o = 0, 1, 4, 5.
    flags = np.zeros((b, k), bool)
    flags[0, [cache + o for o in (2, 3, 5, 6)]] = True
    flags[1, [cache + o for o in (0, 1, 4, 5)]] = True
    return a.astype(dtype), d, flags

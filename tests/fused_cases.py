"""Random inputs for the fused op AtPatchAttention, with the reference's answer (tests and the fuzz)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from maps import FORCED_KINDS, random_detector, random_forced, with_flags

from atpatch.ops import reference

F32 = np.float32
MASKED = np.finfo(F32).min  # what Hugging Face adds for a masked key
BIAS_KINDS = ("none", "padding", "causal", "random")
# How the operands broadcast, as MatMul lets them: a shared axis is 1, or left off (rank 3 or 2).
LAYOUTS = ("full", "shared_keys", "shared_values", "rank3_keys", "rank2_keys")
FLAG_KINDS = ("none", "one", "some", "all")


@dataclass(frozen=True)
class FusedCase:
    feeds: dict[str, np.ndarray]  # the op's inputs by name
    detector: reference.LayerDetector
    scale: float
    forced: np.ndarray  # [batch or 1, k_len or 1]

    def expected(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = self.feeds
        return reference.atpatch_attention(
            f["query"], f["key_t"], f["bias"], f["value"], self.detector, self.forced, self.scale
        )


def attention_map(query: np.ndarray, key_t: np.ndarray, bias: np.ndarray, scale: float) -> np.ndarray:
    """The softmax the fused op patches, as the reference forms it."""
    scores = np.matmul(query, key_t) * F32(scale) + bias
    exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(F32)


def near_tie(attention: np.ndarray, rel: float = 1e-5) -> bool:
    """Whether some row's two largest entries are within float32 rounding of each other: the `top`
    feature (which column holds a row's largest entry) then depends on the order of the sums, so two
    correct implementations may score that column differently. Such a map has no single answer."""
    if attention.shape[-1] < 2 or attention.size == 0:
        return False
    top2 = np.sort(attention, axis=-1)[..., -2:]
    return bool((top2[..., 1] - top2[..., 0] <= rel * top2[..., 1]).any())


def _bias(rng: np.random.Generator, kind: str, batch: int, heads: int, q_len: int, k_len: int) -> np.ndarray:
    if kind == "none" or k_len == 0:
        return np.zeros((), F32)  # what the rewrite feeds a chain without an Add
    if kind == "padding":  # each item's real length; padded keys masked in every row
        bias = np.zeros((batch, 1, 1, k_len), F32)
        for b in range(batch):
            bias[b, ..., int(rng.integers(1, k_len + 1)) :] = MASKED
        return bias
    if kind == "causal":  # the last q_len keys are the queries' own (a KV cache before them)
        rows = np.arange(q_len)[:, None] + (k_len - q_len)
        return np.where(np.arange(k_len)[None, :] > rows, MASKED, F32(0))[None, None].astype(F32)
    return rng.normal(scale=2.0, size=(batch, heads, q_len, k_len)).astype(F32)


def _operands(
    rng: np.random.Generator, layout: str, batch: int, heads: int, q_len: int, k_len: int, depth: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key_shape = {
        "shared_keys": (1, heads, depth, k_len),
        "rank3_keys": (heads, depth, k_len),
        "rank2_keys": (depth, k_len),
    }.get(layout, (batch, heads, depth, k_len))
    value_shape = (batch, 1, k_len, width) if layout == "shared_values" else (batch, heads, k_len, width)
    # Peaked maps (scores of a few units) make columns stand out and rows differ.
    query = rng.normal(scale=1.5, size=(batch, heads, q_len, depth)).astype(F32)
    return query, rng.normal(size=key_shape).astype(F32), rng.normal(size=value_shape).astype(F32)


def random_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int, int],
    *,
    depth: int = 8,
    width: int = 5,
    bias: str = "padding",
    layout: str = "full",
    flags: str = "some",
    forced: str = "none",
    scale: float | None = None,
) -> FusedCase:
    """A case of map `shape` [batch, heads, q_len, k_len] whose detector flags `flags` columns (a
    cut in a wide gap of the reference's scores, so rounding cannot flip a flag), when it can;
    the scale is drawn unless given."""
    batch, heads, q_len, k_len = shape
    query, key_t, value = _operands(rng, layout, batch, heads, q_len, k_len, depth, width)
    bias_value = _bias(rng, bias, batch, heads, q_len, k_len)
    scale = float(rng.uniform(0.1, 1.0)) if scale is None else scale
    detector = random_detector(rng, heads)
    if min(shape) > 0:
        detector = with_flags(attention_map(query, key_t, bias_value, scale), detector, flags, rng) or detector
    forced_mask = random_forced(rng, batch, k_len, forced)
    forced_mask = np.zeros((1, 1), bool) if forced_mask is None else forced_mask
    feeds = {
        "query": query,
        "key_t": key_t,
        "bias": bias_value,
        "value": value,
        "w1": detector.w1,
        "b1": detector.b1,
        "w2": detector.w2,
        "b2": detector.b2,
        "forced": forced_mask,
    }
    return FusedCase(feeds, detector, scale, forced_mask)


def assert_matches(outs: list[np.ndarray], case: FusedCase, atol: float = 1e-5) -> None:
    """The op's outputs against the reference: output within `atol`, the same flags, scores within
    1e-4 of their largest magnitude (the maps agree to float32 rounding, not bit for bit)."""
    output, flags, scores = case.expected()
    np.testing.assert_allclose(outs[0], output, rtol=0, atol=atol)
    np.testing.assert_array_equal(outs[1], flags)
    np.testing.assert_array_equal(np.isneginf(outs[2]), np.isneginf(scores))
    live = np.isfinite(scores)
    size = 1.0 + float(np.abs(scores[live]).max(initial=0.0))
    np.testing.assert_allclose(outs[2][live], scores[live], rtol=0, atol=1e-4 * size)


__all__ = [
    "BIAS_KINDS",
    "FLAG_KINDS",
    "FORCED_KINDS",
    "LAYOUTS",
    "FusedCase",
    "assert_matches",
    "attention_map",
    "near_tie",
    "random_case",
]

"""Hostile inputs for the native AtPatchAttention kernel (run by kernel_hostile_cases.py, under the
sanitizers in CI): each case ends in an error naming the fix or in outputs of the right shape."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from fused_cases import (
    BIAS_KINDS,
    FLAG_KINDS,
    FORCED_KINDS,
    LAYOUTS,
    assert_matches,
    attention_map,
    near_tie,
    random_case,
)

from atpatch.ops.standalone import fused_standalone_model
from atpatch.runtime import native

F32 = np.float32


def _session(scale: float = 1.0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(native.library_path()))
    return ort.InferenceSession(fused_standalone_model(scale=scale).SerializeToString(), options)


def _feeds(shape: tuple[int, int, int, int], depth: int = 4, width: int = 3, **override: np.ndarray) -> dict:
    batch, heads, q_len, k_len = shape
    rng = np.random.default_rng(0)
    feeds = {
        "query": rng.normal(size=(batch, heads, q_len, depth)).astype(F32),
        "key_t": rng.normal(size=(batch, heads, depth, k_len)).astype(F32),
        "bias": np.zeros((), F32),
        "value": rng.normal(size=(batch, heads, k_len, width)).astype(F32),
        "w1": np.ones((6 * heads, 3), F32),
        "b1": np.zeros(3, F32),
        "w2": np.ones(3, F32),
        "b2": np.full(1, -1.0, F32),
        "forced": np.zeros((1, 1), bool),
    }
    feeds.update(override)
    return feeds


def _check(outs: list[np.ndarray], feeds: dict[str, np.ndarray]) -> None:
    query, key_t, value = (np.empty((1,) * (4 - feeds[n].ndim) + feeds[n].shape) for n in ("query", "key_t", "value"))
    batch, heads = np.broadcast_shapes(query.shape[:2], key_t.shape[:2], value.shape[:2])
    want = (batch, heads, query.shape[2], value.shape[3])
    if outs[0].shape != want or outs[0].dtype != F32:
        raise AssertionError(f"output {outs[0].shape} {outs[0].dtype}, expected {want} float32")
    keys = (batch, key_t.shape[3])
    if outs[1].shape != keys or outs[1].dtype != np.bool_ or outs[2].shape != keys:
        raise AssertionError(f"flags {outs[1].shape} / scores {outs[2].shape}, expected {keys}")


def expect_output(feeds: dict[str, np.ndarray]) -> str:
    outs = _session().run(None, feeds)
    _check(outs, feeds)
    return f"output {outs[0].shape}"


def expect_error(feeds: dict[str, np.ndarray], text: str) -> str:
    try:
        _session().run(None, feeds)
    except Exception as err:  # noqa: BLE001 - onnxruntime's error classes vary
        if text.lower() not in str(err).lower():
            raise AssertionError(f"error without {text!r}: {err}") from err
        return str(err).strip().splitlines()[-1][:160]
    raise AssertionError(f"expected an error mentioning {text!r}, the run succeeded")


def _hostile_values() -> dict[str, np.ndarray]:
    feeds = _feeds((2, 3, 5, 5))
    feeds["query"][0, 1, 2, 0] = np.nan
    feeds["key_t"][1, 0, :, 3] = np.inf
    feeds["value"][1, 2, 4, :] = -np.inf
    return feeds


FUSED_CASES: dict[str, Callable[[], str]] = {
    "fused_runs": lambda: expect_output(_feeds((2, 3, 5, 5))),
    "fused_nan_inf_values": lambda: expect_output(_hostile_values()),
    "fused_every_key_masked": lambda: expect_output(_feeds((1, 2, 4, 4), bias=np.full((1, 1, 1, 4), -np.inf, F32))),
    "fused_huge_scores": lambda: expect_output(_feeds((1, 2, 4, 4), query=np.full((1, 2, 4, 4), 3e38, F32))),
    "fused_zero_batch": lambda: expect_output(_feeds((0, 2, 3, 3))),
    "fused_zero_keys": lambda: expect_output(_feeds((2, 2, 3, 0))),
    "fused_zero_queries": lambda: expect_output(_feeds((2, 2, 0, 3))),
    "fused_zero_depth": lambda: expect_output(_feeds((2, 2, 3, 3), depth=0)),
    "fused_zero_width": lambda: expect_output(_feeds((2, 2, 3, 3), width=0)),
    "fused_rank5_query": lambda: expect_error(
        _feeds((2, 2, 3, 3), query=np.ones((1, 2, 2, 3, 4), F32)), "not of rank 2 to 4"
    ),
    "fused_rank1_value": lambda: expect_error(_feeds((2, 2, 3, 3), value=np.ones(3, F32)), "not of rank 2 to 4"),
    "fused_rank5_bias": lambda: expect_error(_feeds((2, 2, 3, 3), bias=np.ones((1, 1, 1, 1, 1), F32)), "rank above 4"),
    "fused_bias_mismatch": lambda: expect_error(_feeds((2, 2, 3, 3), bias=np.ones((4,), F32)), "does not broadcast"),
    "fused_depth_mismatch": lambda: expect_error(
        _feeds((2, 2, 3, 3), key_t=np.ones((2, 2, 5, 3), F32)), "depths or key lengths differ"
    ),
    "fused_heads_mismatch": lambda: expect_error(
        _feeds((2, 2, 3, 3), value=np.ones((2, 3, 3, 3), F32)), "heads do not broadcast"
    ),
    "fused_w1_rows": lambda: expect_error(_feeds((1, 2, 3, 3), w1=np.ones((4, 3), F32)), "fit a detector"),
    "fused_forced_shape": lambda: expect_error(_feeds((2, 2, 3, 3), forced=np.ones((3, 3), bool)), "forced of shape"),
    # The model declares forced bool: onnxruntime refuses another type before the kernel runs.
    "fused_forced_type": lambda: expect_error(
        _feeds((2, 2, 3, 3), forced=np.ones((1, 1), F32)), "expected: (tensor(bool))"
    ),
}


def fused_fuzz(seconds: float, seed: int) -> int:
    """Random shapes, layouts, masks and (sometimes) hostile values; checked against the reference when defined."""
    rng = np.random.default_rng(seed)
    scales = (1.0, 0.125, 0.35)  # 1/sqrt(64), 1/sqrt(8): what models use
    sessions = {scale: _session(scale) for scale in scales}
    end = time.monotonic() + seconds
    runs = compared = ties = 0
    while time.monotonic() < end:
        shape = tuple(int(x) for x in rng.integers(0, [4, 5, 30, 40]))
        if rng.random() < 0.1:
            shape = tuple(int(x) for x in rng.integers(1, [3, 8, 160, 200]))
        batch, heads, q_len, k_len = shape
        q_len = min(q_len, k_len) if rng.random() < 0.7 else q_len
        shape = (batch, heads, q_len, k_len)
        case = random_case(
            rng,
            shape,
            depth=int(rng.integers(0, 24)),
            width=int(rng.integers(0, 12)),
            bias=BIAS_KINDS[runs % len(BIAS_KINDS)] if q_len <= k_len else "random",
            layout=LAYOUTS[runs % len(LAYOUTS)],
            flags=FLAG_KINDS[runs % len(FLAG_KINDS)],
            forced=FORCED_KINDS[runs % len(FORCED_KINDS)],
            scale=scales[runs % len(scales)],
        )
        feeds = dict(case.feeds)
        hostile = rng.random() < 0.3 and feeds["query"].size > 0
        if hostile:
            flat = feeds["query"].reshape(-1)
            picks = rng.integers(0, flat.size, int(rng.integers(1, 4)))
            flat[picks] = rng.choice([np.nan, np.inf, -np.inf, 3e38], len(picks))
        outs = sessions[case.scale].run(None, feeds)
        _check(outs, feeds)
        defined = not hostile and min(shape) > 0 and case.detector.b2[0] != 0  # flags placed in a score gap
        if defined:
            f = case.feeds
            if near_tie(attention_map(f["query"], f["key_t"], f["bias"], case.scale)):
                ties += 1  # no single answer to compare with
            else:
                assert_matches(outs, case)
                compared += 1
        runs += 1
    print(
        f"fused fuzz: {runs} runs in {seconds:.0f} s, seed {seed}: no failure "
        f"({compared} compared with the reference, {ties} skipped for a near tie)"
    )
    return 0

"""Hostile inputs for the native AtPatch kernel, run in a child process so a crash is a result.

    python tests/kernel_hostile_cases.py CASE        # one case; exit 0 when handled sanely
    python tests/kernel_hostile_cases.py --all       # every case in this process
    python tests/kernel_hostile_cases.py --fuzz 120  # random shapes/values/detectors for 120 s

The fused op AtPatchAttention's cases and fuzzing (fused_hostile_cases.py) run here too; the
sessions and sanity checks the cases share are in hostile_session.py.

A case passes when onnxruntime raises an error whose message contains the expected text,
or, for inputs with no defined answer (NaN, Inf, extreme thresholds), when the run returns
outputs of the right shape and type. Anything else exits 1; a crash shows as a signal.
The library is native.library_path(), so ATPATCH_NATIVE_LIBRARY selects e.g. a sanitizer build.
Op v2 (with `forced` and `flags`) unless a case says v1; the fuzzing runs both.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_hostile_cases import FUSED_CASES, fused_fuzz  # noqa: E402
from hostile_session import (  # noqa: E402
    F32,
    check_outputs,
    detector_feeds,
    expect_error,
    expect_output,
    inputs_for,
    make_session,
    uniform,
)
from maps import (  # noqa: E402
    FORCED_KINDS,
    MASKS_V2,
    random_detector,
    random_detector_v1,
    random_forced,
    random_map,
    v1_reference,
    with_flags,
)

from atpatch.ops import reference  # noqa: E402


def expect_session_refused(dtype: type) -> str:
    try:
        sess = make_session(dtype=dtype, shapeless=False)
    except Exception as err:  # noqa: BLE001
        return f"refused: {str(err).strip().splitlines()[0][:160]}"
    out = sess.run(None, inputs_for({"attention": uniform((1, 1, 2, 2), dtype), **detector_feeds(1)}, sess))[0]
    return f"ran: {out.dtype}"  # also sane: an implementation for that type exists


def _nan_map() -> np.ndarray:
    a = uniform((2, 3, 5, 5)).copy()
    a[0, 1, 2, 3] = np.nan
    a[1, :, :, 0] = np.inf
    a[1, 2, 4, :] = -np.inf
    return a


CASES: dict[str, Callable[[], str]] = {
    "rank3": lambda: expect_error({"attention": uniform((2, 5, 5)), **detector_feeds(2)}, "rank 4"),
    "rank5": lambda: expect_error({"attention": uniform((1, 2, 2, 5, 5)), **detector_feeds(2)}, "rank 4"),
    "rank0": lambda: expect_error({"attention": np.array(0.5, F32), **detector_feeds(1)}, "rank 4"),
    "w1_rows": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, w1=np.ones((3, 3), F32))},
        "w1 must be [6 * heads, hidden] = [12, hidden] for this map of 2 heads, got [3,3]",
    ),
    "w1_other_heads": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(4)}, "= [12, hidden] for this map of 2 heads, got [24,3]"
    ),
    "w1_feature_version_1": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, w1=np.ones((4, 3), F32))}, "feature version 4"
    ),
    "w1_feature_version_3": lambda: expect_error(  # three features per head: a detector fitted before v4
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, version=1)},
        "w1 must be [6 * heads, hidden] = [12, hidden] for this map of 2 heads, got [6,3]; "
        "fit a detector for this model (feature version 4)",
    ),
    "w1_rank": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, w1=np.ones(36, F32))},
        "w1 must be [6 * heads, hidden] = [12, hidden]",
    ),
    "w1_rank3": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, w1=np.ones((12, 3, 1), F32))}, "got [12,3,1]"
    ),
    "w1_for_zero_heads": lambda: expect_error(
        {"attention": uniform((2, 0, 3, 3)), **detector_feeds(1)}, "= [0, hidden] for this map of 0 heads"
    ),
    "b1_mismatch": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, b1=np.zeros(4, F32))}, "b1 and w2 must be"
    ),
    "w2_mismatch": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, w2=np.zeros((3, 1), F32))}, "b1 and w2 must be"
    ),
    "b2_two": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, b2=np.zeros(2, F32))}, "b2 must be [1]"
    ),
    "b2_empty": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, b2=np.zeros(0, F32))}, "b2 must be [1]"
    ),
    "k_len_too_long": lambda: expect_error(
        {"attention": np.zeros((1, 1, 1, (1 << 24) + 1), F32), **detector_feeds(1)}, "at most 16777216"
    ),
    "nan_inf_attention": lambda: expect_output({"attention": _nan_map(), **detector_feeds(3)}),
    "nan_inf_attention_flagging": lambda: expect_output(
        {"attention": _nan_map(), **detector_feeds(3, b2=np.full(1, 10.0, F32))}
    ),
    "nan_weights": lambda: expect_output(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, w1=np.full((12, 3), np.nan, F32))}
    ),
    "inf_weights": lambda: expect_output(
        {
            "attention": uniform((1, 2, 3, 3)),
            **detector_feeds(2, w2=np.full(3, np.inf, F32), b2=np.full(1, -np.inf, F32)),
        }
    ),
    "negative_and_denormal": lambda: expect_output(
        {
            "attention": np.array([[[[-1.0, 1e-45, 2.0, -0.0]]]], F32),
            **detector_feeds(1, b2=np.full(1, 5.0, F32)),
        }
    ),
    "all_masked_rows": lambda: expect_output(
        {"attention": np.zeros((2, 2, 3, 4), F32), **detector_feeds(2, b2=np.full(1, 5.0, F32))}
    ),
    "fp16_nan_inf": lambda: expect_output(
        {"attention": _nan_map().astype(np.float16), **detector_feeds(3)}, dtype=np.float16
    ),
    "zero_batch": lambda: expect_output({"attention": uniform((0, 2, 3, 3)), **detector_feeds(2)}),
    "zero_heads": lambda: expect_output({"attention": uniform((2, 0, 3, 3)), **detector_feeds(0)}),
    "zero_q": lambda: expect_output({"attention": uniform((2, 2, 0, 3)), **detector_feeds(2)}),
    "zero_k": lambda: expect_output({"attention": np.zeros((2, 2, 3, 0), F32), **detector_feeds(2)}),
    "zero_hidden": lambda: expect_output(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, hidden=0, b2=np.full(1, 1.0, F32))}
    ),
    "wide_hidden": lambda: expect_output({"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, hidden=200_000)}),
    "threshold_huge": lambda: expect_output({"attention": uniform((1, 2, 3, 3)), **detector_feeds(2)}, threshold=3e38),
    "threshold_inf": lambda: expect_output(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2)}, threshold=float("inf")
    ),
    "threshold_minus_inf": lambda: expect_output(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2)}, threshold=float("-inf")
    ),
    "threshold_nan": lambda: expect_output(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2)}, threshold=float("nan")
    ),
    "fp64_attention": lambda: expect_session_refused(np.float64),
    # `forced` (op v2): bool, rank 2, broadcasting to [batch, k_len].
    "forced_float": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.zeros((2, 3), F32))},
        "forced must be bool, got float32; feed a bool mask [batch, k_len] = [2,3]",
        forced_type=TensorProto.FLOAT,
    ),
    "forced_int64": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.zeros((2, 3), np.int64))},
        "forced must be bool, got int64",
        forced_type=TensorProto.INT64,
    ),
    "forced_rank1": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.zeros(3, bool))},
        "forced must be rank 2, got shape [3]; feed a bool mask [batch, k_len] = [2,3], or [1,1], [batch,1], [1,k_len]",
    ),
    "forced_rank0": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.array(True))}, "forced must be rank 2"
    ),
    "forced_rank3": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.zeros((1, 2, 3), bool))},
        "forced must be rank 2, got shape [1,2,3]",
    ),
    "forced_wrong_batch": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.zeros((3, 3), bool))},
        "forced of shape [3,3] does not broadcast to the map's [batch, k_len] = [2,3]",
    ),
    "forced_wrong_keys": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.zeros((1, 4), bool))},
        "forced of shape [1,4] does not broadcast",
    ),
    "forced_no_rows": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.zeros((0, 3), bool))},
        "forced of shape [0,3] does not broadcast",
    ),
    "forced_absent": lambda: expect_error(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2)}, "forced is missing", forced_absent=True
    ),
    "forced_all": lambda: expect_output(
        {"attention": uniform((2, 2, 3, 3)), **detector_feeds(2, forced=np.ones((1, 1), bool))}
    ),
    "forced_nonzero_bytes": lambda: expect_output(
        {  # bool bytes other than 0 and 1: any non-zero byte is true
            "attention": uniform((2, 2, 3, 5)),
            **detector_feeds(2, forced=np.arange(10, dtype=np.uint8).reshape(2, 5).view(bool)),
        }
    ),
    "forced_for_no_heads": lambda: expect_output(
        {"attention": uniform((2, 0, 3, 4)), **detector_feeds(0, forced=np.ones((2, 4), bool))}
    ),
    "forced_for_no_batch": lambda: expect_output(
        {"attention": uniform((0, 2, 3, 4)), **detector_feeds(2, forced=np.ones((1, 1), bool))}
    ),
    "forced_for_no_queries": lambda: expect_output(
        {"attention": uniform((2, 2, 0, 4)), **detector_feeds(2, forced=np.ones((2, 1), bool))}
    ),
    "forced_padding_rows": lambda: expect_output(
        {"attention": np.zeros((1, 2, 4, 4), F32), **detector_feeds(2, forced=np.ones((1, 4), bool))}
    ),
    "without_scores_output": lambda: expect_output(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2)}, scores_output=False
    ),
    "without_flags_output": lambda: expect_output(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2)}, flags_output=False
    ),
    # Op v1 (models patched before v2): no forced, no flags; its validation is v2's.
    "v1_runs": lambda: expect_output({"attention": _nan_map(), **detector_feeds(3, version=1)}, version=1),
    "v1_runs_uniform": lambda: expect_output(
        {"attention": uniform((2, 2, 5, 5)), **detector_feeds(2, version=1)}, version=1
    ),
    "v1_w1_rows": lambda: expect_error(
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2, w1=np.ones((4, 3), F32))},
        "for this map of 2 heads, got [4,3]; fit a detector for this model (feature version 2)",
        version=1,
    ),
    "v1_w1_v2_detector": lambda: expect_error(  # v1 keeps its three features per head
        {"attention": uniform((1, 2, 3, 3)), **detector_feeds(2)},
        "w1 must be [3 * heads, hidden] = [6, hidden] for this map of 2 heads, got [12,3]; "
        "fit a detector for this model (feature version 2)",
        version=1,
    ),
    "v1_zero_heads": lambda: expect_output(
        {"attention": uniform((2, 0, 3, 3)), **detector_feeds(0, version=1)}, version=1
    ),
}


CASES.update(FUSED_CASES)


def fuzz(seconds: float, seed: int) -> int:
    """Random maps (often hostile) through the kernel; checked against the reference when defined."""
    rng = np.random.default_rng(seed)
    sessions = {(dt, v): make_session(dtype=dt, version=v) for dt in (np.float32, np.float16) for v in (1, 2)}
    # float32 values of a map declared float16: the kernel reads them rounded to float16.
    declared_half = make_session(map_type=TensorProto.FLOAT16)
    end = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < end:
        dtype = np.float32 if rng.random() < 0.7 else np.float16
        version = 1 if rng.random() < 0.2 else 2
        as_half = dtype is np.float32 and version == 2 and rng.random() < 0.3
        shape = tuple(int(x) for x in rng.integers(0, [4, 5, 40, 70]))
        if rng.random() < 0.1:
            shape = tuple(int(x) for x in rng.integers(1, [3, 13, 200, 260]))
        size = int(np.prod(shape))
        # random_map needs every dimension; zero-size maps are plain zeros.
        mask = MASKS_V2[runs % len(MASKS_V2)]
        a = random_map(rng, shape, mask) if min(shape) > 0 else np.zeros(shape, F32)  # type: ignore[arg-type]
        hostile = rng.random() < 0.3 and size > 0
        if hostile:
            flat = a.reshape(-1)
            picks = rng.integers(0, size, int(rng.integers(1, 8)))
            flat[picks] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e-40, 3e38], len(picks))
        with np.errstate(over="ignore"):  # 3e38 -> inf in float16 is one more hostile value
            a = a.astype(dtype)
            seen = a.astype(np.float16).astype(F32) if as_half else a  # what the kernel computes on
        d = random_detector_v1(rng, shape[1]) if version == 1 else random_detector(rng, shape[1])
        with v1_reference() if version == 1 else contextlib.nullcontext():
            if not hostile and size > 0:
                d = with_flags(seen, d, ("none", "one", "some", "all")[runs % 4], rng) or d
            forced = random_forced(rng, shape[0], shape[3], FORCED_KINDS[runs % len(FORCED_KINDS)])
            feeds = {"attention": a, "w1": d.w1, "b1": d.b1, "w2": d.w2, "b2": d.b2}
            if version == 2:
                feeds["forced"] = np.zeros((1, 1), bool) if forced is None else forced
            outs = (declared_half if as_half else sessions[dtype, version]).run(None, feeds)
            check_outputs(outs, a, 1 if version == 1 else 3)
            if not hostile and size > 0 and d.b2[0] != 0.0:  # flags placed in a score gap: defined answer
                expected, expected_flags = reference.atpatch(seen, d, None if version == 1 else forced)
                # float16, or float32 rows left as received where the reference has them rounded
                atol = 1e-6 if dtype is np.float32 and not as_half else 1e-3
                np.testing.assert_allclose(outs[0].astype(F32), expected.astype(F32), rtol=0, atol=atol)
                if version == 2:
                    np.testing.assert_array_equal(outs[1], expected_flags)
                    expected_scores = reference.scores_output(seen, d)
                    np.testing.assert_array_equal(np.isneginf(outs[2]), np.isneginf(expected_scores))
                    live = np.isfinite(expected_scores)
                    scale = 1.0 + float(np.abs(expected_scores[live]).max(initial=0.0))
                    np.testing.assert_allclose(outs[2][live], expected_scores[live], rtol=0, atol=1e-5 * scale)
        runs += 1
    print(f"fuzz: {runs} runs in {seconds:.0f} s, seed {seed}: no failure")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="hostile inputs for the native AtPatch kernel")
    p.add_argument("case", nargs="?", choices=sorted(CASES))
    p.add_argument("--all", action="store_true")
    p.add_argument("--fuzz", type=float, metavar="SECONDS")
    p.add_argument("--seed", type=int, default=int(time.time()))
    args = p.parse_args(argv)
    names = sorted(CASES) if args.all else [args.case] if args.case else []
    failed = 0
    for name in names:
        try:
            print(f"{name}: ok ({CASES[name]()})", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"{name}: FAILED ({err})", flush=True)
            failed += 1
    if args.fuzz:  # two thirds of the time for AtPatch, a third for AtPatchAttention
        fuzz(args.fuzz * 2 / 3, args.seed)
        fused_fuzz(args.fuzz / 3, args.seed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ONNX-function form of AtPatch, run by onnxruntime, equals the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from maps import MASKS, detector_flagging, random_detector, random_map, with_flags

from atpatch.ops import reference, spec
from atpatch.ops.standalone import standalone_model

FP32_ATOL = 1e-6


def _session(opset: int = 17, dtype: int = onnx.TensorProto.FLOAT, threshold: float = 0.0) -> ort.InferenceSession:
    model = standalone_model(opset, dtype, threshold)
    onnx.checker.check_model(model, full_check=True)
    # Function path only: no custom-op library registered.
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


NOTHING_FORCED = np.zeros((1, 1), dtype=bool)


def _run_both(
    session: ort.InferenceSession, a: np.ndarray, det: reference.LayerDetector, forced: np.ndarray = NOTHING_FORCED
) -> tuple[np.ndarray, np.ndarray]:
    feeds = {"attention": a, "w1": det.w1, "b1": det.b1, "w2": det.w2, "b2": det.b2, "forced": forced}
    patched, flags, _ = session.run(None, feeds)
    return patched, flags


def _run(session: ort.InferenceSession, a: np.ndarray, det: reference.LayerDetector) -> np.ndarray:
    return _run_both(session, a, det)[0]


def _random_forced(rng: np.random.Generator, batch: int, keys: int) -> np.ndarray:
    """Nothing, or some positions, in each shape `forced` may take: [1,1], [B,1], [1,K], [B,K]."""
    shape = [(1, 1), (batch, 1), (1, keys), (batch, keys)][int(rng.integers(4))]
    return rng.random(shape) < rng.choice([0.0, 0.2, 0.5])


def _random_shape(rng: np.random.Generator) -> tuple[int, int, int, int]:
    kind = rng.integers(4)
    if kind == 0:  # batch of one, one-token sequences
        return (1, int(rng.integers(1, 4)), 1, int(rng.integers(1, 3)))
    if kind == 1:
        return (1, 1, int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    q = int(rng.integers(1, 33))
    return (
        int(rng.integers(1, 5)),
        int(rng.integers(1, 7)),
        q,
        q if rng.random() < 0.7 else int(rng.integers(1, 33)),
    )


@pytest.mark.parametrize("opset", [15, 17, 18, 23])
def test_function_equals_reference_on_random_maps(opset: int, rng: np.random.Generator) -> None:
    session = _session(opset)
    counts = dict.fromkeys(("none", "one", "some", "all"), 0)
    while sum(counts.values()) < 60:
        shape = _random_shape(rng)
        a = random_map(rng, shape, str(rng.choice(MASKS)))
        how = str(rng.choice(list(counts)))
        det = with_flags(a, random_detector(rng, a.shape[1]), how, rng)
        if det is None:
            continue
        counts[how] += 1
        forced = _random_forced(rng, shape[0], shape[3])
        expected, expected_flags = reference.atpatch(a, det, forced)
        got, flags = _run_both(session, a, det, forced)
        assert got.shape == a.shape and got.dtype == np.float32
        assert flags.dtype == np.bool_ and np.array_equal(flags, expected_flags), f"{shape}: flags differ"
        if how == "none" and not forced.any():
            assert np.array_equal(got, a), f"{shape}: nothing flagged or forced must leave the map bit-identical"
        np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=0, err_msg=f"{shape}, {how} flagged")
    assert min(counts.values()) >= 5, counts


def test_every_column_flagged_leaves_every_row_unchanged(rng: np.random.Generator) -> None:
    a = random_map(rng, (2, 3, 8, 8), "padded")
    det = with_flags(a, random_detector(rng, a.shape[1]), "all", rng)
    assert det is not None
    assert np.array_equal(_run(_session(), a, det), a)


def test_threshold_attribute_decides_which_columns_are_flagged(rng: np.random.Generator) -> None:
    a = random_map(rng, (1, 2, 6, 6), "none")
    det = random_detector(rng, a.shape[1])
    scores = np.sort(reference.column_scores(a, det).ravel())
    cut = float((scores[-1] + scores[-2]) / 2) if scores[-1] - scores[-2] > 1e-3 else float(scores[-1] + 1)
    got = _run(_session(threshold=cut), a, det)
    expected, _ = reference.atpatch(a, reference.LayerDetector(det.w1, det.b1, det.w2, det.b2, cut))
    np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=0)


def test_fp16_maps_run_through_the_function(rng: np.random.Generator) -> None:
    session = _session(dtype=onnx.TensorProto.FLOAT16)
    for how in ("none", "some"):
        a = random_map(rng, (2, 3, 9, 9), "causal").astype(np.float16)
        det = with_flags(a.astype(np.float32), random_detector(rng, a.shape[1]), how, rng)
        if det is None:
            continue
        got = _run(session, a, det)
        assert got.dtype == np.float16
        if how == "none":
            assert np.array_equal(got, a)
        # fp16 keeps ~3 significant digits: compare at its resolution.
        np.testing.assert_allclose(got.astype(np.float32), reference.atpatch(a, det)[0].astype(np.float32), atol=1e-3)


def test_function_is_declared_as_the_spec_says() -> None:
    model = standalone_model(17)
    (function,) = model.functions
    assert (function.domain, function.name) == (spec.DOMAIN, spec.OP_TYPE)
    assert tuple(function.input) == spec.INPUTS and tuple(function.output) == spec.OUTPUTS
    assert [a.name for a in function.attribute_proto] == list(spec.ATTRIBUTES)
    used = {n.op_type for n in function.node}
    assert all(n.domain in ("", "ai.onnx") for n in function.node), "standard ops only"
    assert "Softmax" not in used


def test_forced_columns_are_patched_although_the_detector_flags_nothing(rng: np.random.Generator) -> None:
    a = random_map(rng, (2, 3, 8, 8), "none")  # every row has other keys to take the forced column's weight
    det = with_flags(a, random_detector(rng, a.shape[1]), "none", rng)
    assert det is not None
    forced = np.zeros((2, 8), dtype=bool)
    forced[1, 0] = True
    got, flags = _run_both(_session(), a, det, forced)
    assert not flags.any(), "forced positions are not the detector's flags"
    assert np.array_equal(got[0], a[0]), "an item with nothing forced stays bit-identical"
    np.testing.assert_allclose(got, reference.patch_columns(a, forced), atol=FP32_ATOL, rtol=0)
    assert not np.array_equal(got[1], a[1])


def test_padding_queries_do_not_change_flags_or_real_outputs(rng: np.random.Generator) -> None:
    """The same 6 real tokens, padded BERT-style (keys masked, padding queries still attend) to 6..14."""
    real = random_map(rng, (1, 2, 6, 6), "none")
    det = detector_flagging(rng, real, "some")
    session = _session()
    base, base_flags = _run_both(session, real, det)
    for length in (7, 10, 14):
        padded = np.zeros((1, 2, length, length), np.float32)
        padded[:, :, :6, :6] = real
        padded[:, :, 6:, :6] = random_map(rng, (1, 2, length - 6, 6), "none")  # padding queries see real keys
        got, flags = _run_both(session, padded, det)
        assert np.array_equal(flags[:, :6], base_flags) and not flags[:, 6:].any()
        np.testing.assert_allclose(got[:, :, :6, :6], base, atol=FP32_ATOL, rtol=0)

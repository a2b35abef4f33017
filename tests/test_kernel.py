"""The native AtPatch kernel == the ONNX function == the numpy reference, and honours spec.py.

Op v2 here; models patched with v1 are checked in test_kernel_v1.py.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
from maps import (
    FORCED_KINDS,
    MASKS,
    MASKS_V2,
    detector_flagging,
    op_feeds,
    own_row_map,
    pad_batch_item,
    random_detector,
    random_forced,
    random_map,
    unchanged_rows,
    with_flags,
)
from onnx import TensorProto

from atpatch.ops import reference, spec
from atpatch.ops.standalone import standalone_model
from atpatch.runtime import native

LIBRARY = native.library_path()
pytestmark = pytest.mark.skipif(
    LIBRARY is None,
    reason="native kernel not built: run scripts/fetch_ort_headers.sh, then pip install . (or -e .)",
)

DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
# Big maps are few: they cost seconds in the numpy reference, not in the kernel.
BIG_SHAPES = [(4, 12, 384, 384), (2, 12, 256, 256), (1, 12, 384, 384), (8, 4, 128, 96)]
# The function is compared as well once it is v2 (it is being rewritten alongside the kernel).
_FUNCTION = standalone_model(17, TensorProto.FLOAT, 0.0).functions[0]
FUNCTION_IS_V2 = (len(_FUNCTION.input), len(_FUNCTION.output)) == (len(spec.INPUTS), len(spec.OUTPUTS))


def session(dtype: type, native_kernel: bool, threshold: float = 0.0, opset: int = 17) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if native_kernel:
        options.register_custom_ops_library(str(LIBRARY))
    model = standalone_model(opset, DTYPES[dtype], threshold).SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions() -> dict[tuple[type, bool], ort.InferenceSession]:
    return {(dt, nat): session(dt, nat) for dt in DTYPES for nat in (True, False)}


def assert_scores_match(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal -inf (unattended columns) exactly; finite scores to float32 rounding of the detector's dots
    (the kernel sums them in double, numpy in float32 BLAS): within 1e-5 of the map's largest score,
    as terms of that size cancel (seen: scores up to 400, apart by 2.4e-4)."""
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    live = np.isfinite(expected)
    scale = 1.0 + float(np.abs(expected[live]).max(initial=0.0))
    np.testing.assert_allclose(got[live], expected[live], rtol=0, atol=1e-5 * scale)


def random_shape(rng: np.random.Generator, i: int) -> tuple[int, int, int, int]:
    if i % 10 == 7:  # more queries than keys: rows with no key of their own are real
        return (int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(5, 10)), int(rng.integers(1, 5)))
    if i % 100 == 99:
        return (
            int(rng.integers(1, 4)),
            int(rng.integers(1, 13)),
            int(rng.integers(32, 129)),
            int(rng.integers(32, 129)),
        )
    if i < 4:  # the smallest maps first: every dimension 1
        return (1, 1, 1, 1 + i)
    return tuple(int(x) for x in rng.integers(1, [4, 5, 10, 14]))  # type: ignore[return-value]


def check_case(
    sessions: dict[tuple[type, bool], ort.InferenceSession],
    attention: np.ndarray,
    d: reference.LayerDetector,
    how: str,
    forced: np.ndarray | None = None,
) -> None:
    dtype = attention.dtype.type
    expected, expected_flags = reference.atpatch(attention, d, forced)
    expected_scores = reference.scores_output(attention, d)
    got, flags, scores = sessions[dtype, True].run(None, op_feeds(attention, d, forced))
    assert_scores_match(scores, expected_scores)
    assert got.dtype == attention.dtype and got.shape == attention.shape
    assert flags.dtype == np.bool_ and flags.shape == (attention.shape[0], attention.shape[3])
    atol = 1e-6 if dtype is np.float32 else 1e-3  # fp16: one unit in the last place near 1
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=atol)
    np.testing.assert_array_equal(flags, expected_flags)
    if FUNCTION_IS_V2:
        fn, fn_flags, fn_scores = sessions[dtype, False].run(None, op_feeds(attention, d, forced))
        np.testing.assert_allclose(got.astype(np.float32), fn.astype(np.float32), rtol=0, atol=atol)
        np.testing.assert_array_equal(flags, fn_flags)
        assert_scores_match(fn_scores, expected_scores)
    patched = expected_flags if forced is None else expected_flags | np.broadcast_to(forced, expected_flags.shape)
    same = unchanged_rows(attention, patched)
    assert np.array_equal(got[same], attention[same]), "untouched rows must be bit-identical"
    if how == "none" and forced is None:
        assert np.array_equal(got, attention) and not flags.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_kernel_equals_function_and_reference(sessions, dtype: type, rng: np.random.Generator) -> None:
    cases = 1000 if dtype is np.float32 else 300
    counts = {"none": 0, "one": 0, "some": 0, "all": 0}
    forced_counts = dict.fromkeys(FORCED_KINDS, 0)
    padding_rows = 0
    for i in range(cases):
        shape = random_shape(rng, i)
        mask = MASKS_V2[i % len(MASKS_V2)]
        attention = random_map(rng, shape, mask).astype(dtype)
        how = ("none", "one", "some", "all")[(i // len(MASKS_V2)) % 4]
        d = with_flags(attention, random_detector(rng, attention.shape[1]), how, rng)
        if d is None:
            how = "none"
            d = with_flags(attention, random_detector(rng, attention.shape[1]), how, rng)
        assert d is not None
        kind = FORCED_KINDS[i % len(FORCED_KINDS)]  # with i % 4 for the mask: every pair
        forced = random_forced(rng, shape[0], shape[3], kind)
        counts[how] += 1
        forced_counts[kind] += 1
        padding_rows += int((~reference.real_queries(attention)).sum())
        check_case(sessions, attention, d, how, forced)
    assert min(counts.values()) > cases // 10, counts
    assert min(forced_counts.values()) > cases // 10, forced_counts
    assert padding_rows > cases, padding_rows


@pytest.mark.parametrize("shape", BIG_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_on_big_maps(sessions, shape: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    for mask, how, kind in (("padded", "some", "[B,K]"), ("causal", "none", "none"), ("none", "one", "[1,K]")):
        attention = random_map(rng, shape, mask)
        d = with_flags(attention, random_detector(rng, attention.shape[1]), how, rng) or with_flags(
            attention, random_detector(rng, attention.shape[1]), "none", rng
        )
        check_case(sessions, attention, d, how, random_forced(rng, shape[0], shape[3], kind))


def test_threshold_attribute_is_read(rng: np.random.Generator) -> None:
    attention = random_map(rng, (2, 3, 6, 9), "padded")
    d = random_detector(rng, attention.shape[1])
    scores = np.sort(reference.column_scores(attention, d).ravel())
    gaps = np.diff(scores)
    i = int(np.argmax(gaps))
    threshold = float((scores[i] + scores[i + 1]) / 2)
    d = reference.LayerDetector(d.w1, d.b1, d.w2, d.b2, threshold)
    expected, expected_flags = reference.atpatch(attention, d)
    got, flags, _ = session(np.float32, True, threshold).run(None, op_feeds(attention, d))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(flags, expected_flags)


def test_concurrent_runs_on_one_session(rng: np.random.Generator) -> None:
    sess = session(np.float32, True)
    work = []
    for i in range(100):
        attention = random_map(rng, (2, 4, 24, 24 + i % 7), MASKS[i % 3])
        heads = attention.shape[1]
        d = with_flags(attention, random_detector(rng, heads), ("some", "none", "one")[i % 3], rng) or with_flags(
            attention, random_detector(rng, heads), "none", rng
        )
        forced = random_forced(rng, attention.shape[0], attention.shape[3], FORCED_KINDS[i % len(FORCED_KINDS)])
        work.append((attention, d, forced, reference.atpatch(attention, d, forced)))
    errors: list[BaseException] = []

    def worker(part: int) -> None:
        try:
            for attention, d, forced, (expected, expected_flags) in work[part::4]:
                for _ in range(3):
                    got, flags, _ = sess.run(None, op_feeds(attention, d, forced))
                    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
                    np.testing.assert_array_equal(flags, expected_flags)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_library_reports_the_spec_contract() -> None:
    info = native.library_info(LIBRARY)
    assert info["domain"] == spec.DOMAIN
    assert info["op_type"] == spec.OP_TYPE
    assert info["version"] == spec.VERSION
    assert tuple(info["inputs"]) == spec.INPUTS
    assert tuple(info["outputs"]) == spec.OUTPUTS
    assert info["attributes"] == {k: v[1] for k, v in spec.ATTRIBUTES.items()}
    assert info["features_per_head"] == spec.FEATURES_PER_HEAD
    assert info["feature_version"] == spec.FEATURE_VERSION
    assert tuple(info["feature_names"]) == spec.FEATURE_NAMES
    assert tuple(info["dtypes"]) == spec.SUPPORTED_DTYPES
    # Version 1 stays registered for models patched before v2 (test_kernel_v1.py).
    assert info["versions"] == [1, spec.VERSION]
    assert info["v1"] == {
        "inputs": list(spec.INPUTS[:5]),
        "outputs": list(spec.OUTPUTS[:1]),
        "features_per_head": 3,
        "feature_version": 2,
    }
    # The fused op, in the same domain: spec.py's contract, float32, on the providers the library has.
    fused = info["fused"]
    assert fused["op_type"] == spec.FUSED_OP_TYPE
    assert (tuple(fused["inputs"]), tuple(fused["outputs"])) == (spec.FUSED_INPUTS, spec.FUSED_OUTPUTS)
    assert fused["attributes"] == {k: v[1] for k, v in spec.FUSED_ATTRIBUTES.items()}
    assert fused["dtypes"] == ["float32"] and fused["providers"] == info["providers"]


def test_flagged_entries_get_the_smallest_unflagged_entry() -> None:
    """Hand-computed: one head, score = peak, threshold 0.4 flags only the 0.5 column."""
    attention = np.array([[[[0.2, 0.3, 0.0, 0.5]]]], np.float32)  # its own key (the last) is unmasked: real
    d = reference.LayerDetector(
        w1=np.array([[0.0], [1.0], [0.0], [0.0], [0.0], [0.0]], np.float32),  # head 0's six features -> peak
        b1=np.zeros(1, np.float32),
        w2=np.ones(1, np.float32),
        b2=np.zeros(1, np.float32),
        threshold=0.4,
    )
    sess = session(np.float32, True, 0.4)
    expected = np.array([[[[0.2 / 0.7, 0.3 / 0.7, 0.0, 0.2 / 0.7]]]], np.float32)
    got, flags, _ = sess.run(None, op_feeds(attention, d))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(flags, [[False, False, False, True]])
    np.testing.assert_allclose(reference.atpatch(attention, d)[0], expected, rtol=0, atol=1e-6)
    # Forcing the 0.3 column too: both get the smallest entry outside P, 0.2.
    forced = np.array([[False, True, False, False]])
    expected = np.array([[[[0.2 / 0.6, 0.2 / 0.6, 0.0, 0.2 / 0.6]]]], np.float32)
    got, flags, _ = sess.run(None, op_feeds(attention, d, forced))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(flags, [[False, False, False, True]])  # forced is not folded into flags
    # A padding query (its own key masked) counts in no feature: nothing is flagged, but the
    # patch still applies to it, so forced columns are patched there too.
    padding = np.array([[[[0.5, 0.3, 0.2, 0.0]]]], np.float32)
    got, flags, _ = sess.run(None, op_feeds(padding, d))
    np.testing.assert_array_equal(got, padding)
    assert not flags.any()
    got, flags, _ = sess.run(None, op_feeds(padding, d, np.array([[True, False, False, False]])))
    np.testing.assert_allclose(got, [[[[0.2 / 0.7, 0.3 / 0.7, 0.2 / 0.7, 0.0]]]], rtol=0, atol=1e-6)
    assert not flags.any()


def test_own_row_features_alone_flag_what_the_reference_flags(rng: np.random.Generator) -> None:
    """A map where only the own-row features (self, opeak, ofocus) tell the query keys apart: a
    detector reading `self` flags exactly the keys the reference (and the hand count) says. The
    CUDA self-test runs the same case on the device code (own_row_case)."""
    sess = session(np.float32, True)
    attention, d, want = own_row_map()
    features = reference.column_features(attention)
    heads, query_keys = attention.shape[1], slice(2, None)
    received = features[:, query_keys, : 3 * heads]  # mass, peak, top: the same for every query key
    np.testing.assert_allclose(received, received[:, :1].repeat(received.shape[1], 1), rtol=1e-6)
    np.testing.assert_array_equal(reference.flag_columns(attention, d), want)
    for dtype in (np.float32, np.float16):
        got, flags, _ = session(dtype, True).run(None, op_feeds(attention.astype(dtype), d))
        np.testing.assert_array_equal(flags, want)
        expected = reference.atpatch(attention.astype(dtype), d)[0]
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=1e-3)
    # Each own-row feature, alone, moves the flags as the reference says: a column's weight on
    # itself, how peaked its row is and how concentrated, on random maps (padding rows included).
    for name in ("self", "opeak", "ofocus"):
        f, checked = spec.FEATURE_NAMES.index(name), 0
        for i in range(40):
            attention = random_map(rng, (2, 3, 6 + i % 4, 6 + i % 5), MASKS_V2[i % len(MASKS_V2)])
            base = random_detector(rng, 3)
            w1 = np.zeros_like(base.w1)
            w1[f * 3 : (f + 1) * 3] = base.w1[f * 3 : (f + 1) * 3]  # this feature of every head, nothing else
            d = with_flags(attention, reference.LayerDetector(w1, base.b1, base.w2, base.b2, 0.0), "some", rng)
            if d is None:
                continue
            expected, expected_flags = reference.atpatch(attention, d)
            got, flags, _ = sess.run(None, op_feeds(attention, d))
            np.testing.assert_array_equal(flags, expected_flags)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
            checked += 1
        assert checked >= 20, (name, checked)


def test_padding_changes_no_flag_and_no_real_row(rng: np.random.Generator) -> None:
    """BERT-style padding (padded keys masked in every row, padded queries attending the real
    keys) leaves the features, flags and real rows as they are: only real query rows count."""
    sess = session(np.float32, True)
    for i in range(30):
        n = int(rng.integers(1, 9))
        real = random_map(rng, (1, int(rng.integers(1, 4)), n, n), "none")
        padded = pad_batch_item(rng, real, n + int(rng.integers(1, 6)))
        d = with_flags(real, random_detector(rng, real.shape[1]), ("some", "one", "all")[i % 3], rng) or with_flags(
            real, random_detector(rng, real.shape[1]), "none", rng
        )
        got, flags, scores = sess.run(None, op_feeds(real, d))
        got_padded, flags_padded, scores_padded = sess.run(None, op_feeds(padded, d))
        np.testing.assert_array_equal(flags_padded[:, :n], flags)
        assert not flags_padded[:, n:].any()
        # Scores too (the joint rule sums them): the same on real keys, -inf on padded ones.
        np.testing.assert_array_equal(scores_padded[:, :n], scores)
        assert np.isneginf(scores_padded[:, n:]).all()
        # The padded keys add masked entries only: the real rows' sums, and so their values, stay.
        np.testing.assert_array_equal(got_padded[:, :, :n, :n], got)
        assert not got_padded[:, :, :, n:].any()
        np.testing.assert_allclose(got_padded, reference.atpatch(padded, d)[0], rtol=0, atol=1e-6)


def test_output_in_place_of_a_softmax(rng: np.random.Generator) -> None:
    """Softmax -> AtPatch: onnxruntime may hand the kernel the softmax's buffer as its output."""
    from onnx import helper

    model = standalone_model(17, TensorProto.FLOAT, 0.0)
    model.graph.input[0].name = "logits"
    model.graph.node.insert(0, helper.make_node("Softmax", ["logits"], ["attention"], axis=-1))
    del model.functions[:]
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    softmax_only = helper.make_model(
        helper.make_graph(
            [helper.make_node("Softmax", ["logits"], ["attention"], axis=-1)],
            "softmax",
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("attention", TensorProto.FLOAT, None)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    softmax = ort.InferenceSession(softmax_only.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, shape in enumerate([(2, 3, 7, 7), (1, 12, 64, 64), (4, 4, 128, 128)]):  # inline and pooled paths
        logits = rng.normal(size=shape).astype(np.float32) * 3
        logits[0, ..., shape[-1] // 2 :] = -np.inf  # padded keys (and so padding queries) in item 0
        attention = softmax.run(None, {"logits": logits})[0]
        d = detector_flagging(rng, attention, "some")
        forced = random_forced(rng, shape[0], shape[3], FORCED_KINDS[1 + i % 4])
        expected, expected_flags = reference.atpatch(attention, d, forced)
        inputs = op_feeds(attention, d, forced)
        del inputs["attention"]
        got, flags, _ = sess.run(None, {**inputs, "logits": logits})
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(flags, expected_flags)
        patched = expected_flags | np.broadcast_to(forced, expected_flags.shape)
        same = unchanged_rows(attention, patched)
        assert np.array_equal(got[same], attention[same])


def test_kernel_refuses_a_detector_for_another_head_count(rng: np.random.Generator) -> None:
    attention = random_map(rng, (1, 4, 5, 5), "none")
    sess = session(np.float32, True)
    # 4: a feature-version-1 detector; 12: three features per head (feature versions 2 and 3)
    for w1_rows in (spec.num_features(2), 4, 12, spec.num_features(4) + 1):
        d = random_detector(rng, 4)
        d = reference.LayerDetector(np.ones((w1_rows, d.w1.shape[1]), np.float32), d.b1, d.w2, d.b2, 0.0)
        wanted = rf"w1 must be \[6 \* heads, hidden\] = \[24, hidden\] for this map of 4 heads, got \[{w1_rows},"
        with pytest.raises(Exception, match=wanted):
            sess.run(None, op_feeds(attention, d))

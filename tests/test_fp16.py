"""fp16 models: a tiny BERT converted to float16, patched, run through the ONNX function and the native kernel.

Tolerances: an fp16 attention map holds ~3 significant digits, so the patched map is compared
to the numpy reference at 1e-3 (one unit in the last place near 1, as tests/test_function.py);
logits of the function and the kernel on the same patched fp16 model at 3e-2, as those of a
pass-through model against the original (fp16 rounding accumulated over two layers, measured ~3e-3).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from maps import detector_flagging, op_feeds, unchanged_rows

from atpatch.detector import Detector
from atpatch.ops import reference, spec
from atpatch.ops.reference import LayerDetector
from atpatch.ops.standalone import standalone_model
from atpatch.rewrite import patch_model
from atpatch.runtime import create_session, native

MAP_ATOL = 1e-3
LOGIT_ATOL = 3e-2
PATHS = ("function", "kernel")


@pytest.fixture(scope="module")
def bert(exported):  # noqa: ANN001, ANN201
    """(export result, its fp16 conversion with fp32 inputs/outputs)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    result = exported("bert", False, 17)
    half = convert_float_to_float16(result.model, keep_io_types=True)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)
    return result, half


def _use_native(path: str) -> bool:
    if path == "kernel" and native.library_path() is None:
        pytest.skip("the native AtPatch kernel is not built (scripts/fetch_ort_headers.sh, then pip install -e .)")
    return path == "kernel"


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy that also returns the named tensors (AtPatch inputs and outputs)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return copy


def _atpatch_io(model: onnx.ModelProto) -> list[str]:
    return [name for n in model.graph.node if n.domain == spec.DOMAIN for name in (n.input[0], n.output[0])]


@pytest.mark.parametrize("path", PATHS)
def test_fp16_pass_through_leaves_every_map_and_the_logits_unchanged(
    bert,
    path: str,
    rng: np.random.Generator,  # noqa: ANN001
) -> None:
    result, half = bert
    use_native = _use_native(path)
    patched, sites = patch_model(half)
    assert len(sites) == 2 and sum(n.domain == spec.DOMAIN for n in patched.graph.node) == 2
    inputs = result.family.make_inputs(result.config, 3, 13, rng)
    original = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    logits = create_session(patched, use_native=use_native).run(None, inputs)[0]
    # Read the maps from a copy: a map that is also a graph output changes how onnxruntime casts around it.
    probe = _with_outputs(patched, _atpatch_io(patched))
    _, *maps = create_session(probe, use_native=use_native).run(None, inputs)
    for before, after in zip(maps[::2], maps[1::2], strict=True):
        assert before.dtype == after.dtype == np.float16
        np.testing.assert_array_equal(after, before)  # each AtPatch passes its fp16 map through bit for bit
    if use_native:
        np.testing.assert_array_equal(logits, original)
    else:
        # Not bit-equal end to end: onnxruntime's CPU has no fp16 Softmax/MatMul, runs both in fp32 and,
        # in the unpatched graph, drops the fp16 rounding between them; with the function's fp16 ops in
        # between, P.V sees the map rounded to fp16 as the graph says. Measured difference ~2e-3.
        np.testing.assert_allclose(logits, original, rtol=0, atol=LOGIT_ATOL)


def _layer(w1: np.ndarray, threshold: float) -> LayerDetector:
    heads = w1.shape[1]
    return LayerDetector(
        w1, np.full(heads, -threshold, np.float32), np.ones(heads, np.float32), np.zeros(1, np.float32), 0.0
    )


def _peak_detector(maps: np.ndarray) -> Detector:
    """Layer 0 flags columns whose peak attention in any head exceeds a cut placed in a wide gap of
    this input's peaks (so fp16 rounding cannot flip a flag); layer 1 flags nothing, so layer 0's map,
    the one checked, is the same in the fp32 and fp16 runs up to rounding. Peaks are taken over
    the real query rows, as the op takes them (spec.py): a padding row's peaks are not features."""
    heads = maps.shape[1]
    w1 = np.zeros((spec.num_features(heads), heads), np.float32)
    start = spec.FEATURE_NAMES.index("peak") * heads
    w1[start : start + heads] = np.eye(heads, dtype=np.float32)
    real = reference.real_queries(maps)[..., None]
    column_peaks = np.where(real, maps.astype(np.float32), 0).max(axis=2).max(axis=1)
    peaks = np.sort(np.unique(column_peaks.round(4)))
    gaps = [(peaks[i + 1] - peaks[i], i) for i in range(len(peaks) // 4, len(peaks) - 1)]
    width, i = max(gaps)
    assert width > 1e-2, f"no wide gap in this input's column peaks: {peaks}"
    cut = float(peaks[i] + width / 2)
    return Detector(layers=(_layer(w1, cut), _layer(w1, 10.0)), kind="test-peak")


@pytest.mark.parametrize("path", PATHS)
def test_fp16_flagged_columns_are_patched_as_the_reference_says(
    bert,
    path: str,
    rng: np.random.Generator,  # noqa: ANN001
) -> None:
    result, half = bert
    use_native = _use_native(path)
    inputs = result.family.make_inputs(result.config, 3, 13, rng)
    tap = patch_model(half)[1][0].tap
    map0 = ort.InferenceSession(_with_outputs(half, [tap]).SerializeToString()).run(None, inputs)[1]
    detector = _peak_detector(map0)

    patched, _ = patch_model(half, detector)
    logits, before, after = create_session(_with_outputs(patched, _atpatch_io(patched)[:2]), use_native=use_native).run(
        None, inputs
    )
    assert after.dtype == np.float16
    expected, flagged = reference.atpatch(before, detector.layers[0])  # flagged: [batch, key]
    assert 0 < flagged.mean() < 1, "the detector should flag some columns and leave others"
    flagged_rows = np.any(expected != before.astype(np.float32), axis=-1)
    np.testing.assert_allclose(after.astype(np.float32), expected, rtol=0, atol=MAP_ATOL)
    np.testing.assert_array_equal(after[~flagged_rows], before[~flagged_rows])

    # End to end, against the op's other form on the same fp16 model. The fp32 model is no oracle
    # here: an entry that underflows to 0 in fp16 counts as masked (spec.py), which can move a row's
    # benign value (its smallest unflagged entry) far from the fp32 run's.
    if native.library_path() is not None:
        other = create_session(_with_outputs(patched, _atpatch_io(patched)[:2]), use_native=not use_native)
        np.testing.assert_allclose(logits, other.run(None, inputs)[0], rtol=0, atol=LOGIT_ATOL)


def test_kernel_reads_a_float32_map_declared_float16_as_that_float16_map(rng: np.random.Generator) -> None:
    """onnxruntime's CPU provider runs an fp16 model's AtPatch in float32 when its neighbours run so
    (spec.py, map_type), handing the kernel the map unrounded. With map_type float16 the kernel
    must compute what the reference computes on the map rounded to float16; without it, on the
    values as they come. The map has real rows whose own entry underflows in float16 (padding
    rows there, real ones unrounded) and entries down in float16's subnormals (2^-24 .. 2^-14)."""
    if native.library_path() is None:
        pytest.skip("the native AtPatch kernel is not built (scripts/fetch_ort_headers.sh, then pip install -e .)")
    b, h, n = 3, 4, 12
    scores = rng.normal(size=(b, h, n, n)) * 6.0  # peaked rows: many entries far below 2^-14
    scores[..., n - 2 :] = -np.inf  # two padded keys
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    attention = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    for q in rng.choice(n - 2, size=4, replace=False):  # real tokens that barely attend to themselves
        attention[:, :, q, q] = rng.uniform(1e-9, 2.0**-25, size=(b, h))
    rounded = attention.astype(np.float16).astype(np.float32)
    assert (reference.real_queries(rounded) != reference.real_queries(attention)).any()
    assert ((rounded > 0) & (rounded < 2.0**-14)).any()
    d = detector_flagging(rng, rounded, "some")
    feeds = op_feeds(attention, d)

    for declared, seen in ((onnx.TensorProto.FLOAT16, rounded), (None, attention)):
        model = standalone_model(17, onnx.TensorProto.FLOAT, 0.0)
        if declared is not None:
            model.graph.node[0].attribute.append(onnx.helper.make_attribute("map_type", declared))
        got, flags, _ = create_session(model, use_native=True).run(None, feeds)
        expected, expected_flags = reference.atpatch(seen, d)
        np.testing.assert_array_equal(flags, expected_flags)
        changed = ~unchanged_rows(seen, expected_flags)
        assert changed.any() or declared is None, "the detector flags some columns of the rounded map"
        np.testing.assert_allclose(got[changed], expected[changed], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got[~changed], attention[~changed])  # as received, bit for bit


def test_a_float16_model_patched_before_map_type_is_named_when_the_kernel_runs_it(
    bert,
    caplog: pytest.LogCaptureFixture,  # noqa: ANN001
) -> None:
    """A file patched before the rewrite set map_type still runs, and the session says how to fix it."""
    _use_native("kernel")
    _, half = bert
    patched, _ = patch_model(half)
    nodes = [n for n in patched.graph.node if n.domain == spec.DOMAIN]
    declared = [a.i for n in nodes for a in n.attribute if a.name == "map_type"]
    assert nodes and declared == [onnx.TensorProto.FLOAT16] * len(nodes)
    assert native.float16_maps_without_map_type(patched) == 0
    for n in nodes:
        kept = [a for a in n.attribute if a.name != "map_type"]
        del n.attribute[:]
        n.attribute.extend(kept)
    assert native.float16_maps_without_map_type(patched) == len(nodes)
    with caplog.at_level("WARNING", logger="atpatch"):
        create_session(patched, use_native=True)
    said = [r.getMessage() for r in caplog.records if "map_type" in r.getMessage()]
    assert len(said) == 1 and f"{len(nodes)} AtPatch node(s)" in said[0] and "atpatch-export" in said[0]

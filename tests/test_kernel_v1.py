"""Models patched with op v1 still run on the native kernel (its v1 mode), next to v2 models.

Once the library is registered, onnxruntime runs its kernel and never the model's own ONNX
function, so the kernel must implement v1 as v1 did: every query row counted in the features,
no `forced`, no `flags`. The oracle is the v1 function travelling in tests/data/v1_patched_bert.onnx
(written before v2, see tests/data/README.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from maps import MASKS_V2, random_detector, random_detector_v1, random_map, v1_reference, with_flags
from onnx import TensorProto, helper

from atpatch.ops import reference, spec
from atpatch.ops.standalone import standalone_model
from atpatch.runtime import native

LIBRARY = native.library_path()
pytestmark = pytest.mark.skipif(
    LIBRARY is None,
    reason="native kernel not built: run scripts/fetch_ort_headers.sh, then pip install . (or -e .)",
)
DATA = Path(__file__).resolve().parent / "data"
CPU = ["CPUExecutionProvider"]
DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _bert() -> onnx.ModelProto:
    return onnx.load(str(DATA / "v1_patched_bert.onnx"))


def _saved() -> dict[str, np.ndarray]:
    with np.load(DATA / "v1_patched_bert.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _session(model: onnx.ModelProto, native_kernel: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if native_kernel:
        options.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), options, providers=CPU)


def _v1_function() -> onnx.FunctionProto:
    (function,) = [f for f in _bert().functions if (f.domain, f.name) == (spec.DOMAIN, spec.OP_TYPE)]
    assert (len(function.input), len(function.output)) == (5, 1), "the fixture's function must be v1"
    return function


def standalone_v1(
    dtype: int = TensorProto.FLOAT, threshold: float = 0.0, with_function: bool = True
) -> onnx.ModelProto:
    """`patched = AtPatch(attention, w1, b1, w2, b2)` of ai.atpatch version 1, the fixture's function inside."""
    f = TensorProto.FLOAT
    names = ["attention", "w1", "b1", "w2", "b2"]
    shapes = [["batch", "heads", "q_len", "k_len"], ["features", "hidden"], ["hidden"], ["hidden"], [1]]
    inputs = [
        helper.make_tensor_value_info(n, dtype if n == "attention" else f, s)
        for n, s in zip(names, shapes, strict=True)
    ]
    output = helper.make_tensor_value_info("patched", dtype, shapes[0])
    node = helper.make_node(spec.OP_TYPE, names, ["patched"], domain=spec.DOMAIN, threshold=threshold)
    opset = next(o.version for o in _v1_function().opset_import if o.domain == "")
    model = helper.make_model(
        helper.make_graph([node], "atpatch_v1", inputs, [output]),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(spec.DOMAIN, 1)],
        functions=[_v1_function()] if with_function else [],
    )
    model.ir_version = 9
    return model


def test_v1_bert_runs_on_the_kernel_as_its_function_did() -> None:
    saved = _saved()
    inputs = {"input_ids": saved["input_ids"], "attention_mask": saved["attention_mask"]}
    model = _bert()
    assert [o.version for o in model.opset_import if o.domain == spec.DOMAIN] == [1]
    del model.functions[:]  # only the kernel can run it now
    logits = _session(model, True).run(None, inputs)[0]
    np.testing.assert_allclose(logits, saved["logits"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(logits[3], saved["logits"][3])  # unflagged: untouched attention
    with_function = _session(_bert(), True).run(None, inputs)[0]  # registered: the kernel, not the function
    np.testing.assert_array_equal(with_function, logits)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_v1_kernel_equals_the_v1_function(dtype: type, rng: np.random.Generator) -> None:
    kernel = _session(standalone_v1(DTYPES[dtype], with_function=False), True)
    function = _session(standalone_v1(DTYPES[dtype]), False)
    atol = 1e-6 if dtype is np.float32 else 1e-3
    cases = 300 if dtype is np.float32 else 100
    counts = {"none": 0, "one": 0, "some": 0, "all": 0}
    padding_rows = 0
    for i in range(cases):
        shape = (1, 1, 1, 1 + i) if i < 3 else tuple(int(x) for x in rng.integers(1, [4, 5, 10, 14]))
        attention = random_map(rng, shape, MASKS_V2[i % len(MASKS_V2)]).astype(dtype)  # type: ignore[arg-type]
        padding_rows += int((~reference.real_queries(attention)).sum())
        how = ("none", "one", "some", "all")[(i // len(MASKS_V2)) % 4]
        with v1_reference():
            d = with_flags(attention, random_detector_v1(rng, shape[1]), how, rng)
            if d is None:
                how = "none"
                d = with_flags(attention, random_detector_v1(rng, shape[1]), how, rng)
            assert d is not None
            expected = reference.atpatch(attention, d)[0]
            flagged = reference.column_scores(attention, d) > d.threshold
        counts[how] += 1
        feeds = {"attention": attention, "w1": d.w1, "b1": d.b1, "w2": d.w2, "b2": d.b2}
        got = kernel.run(None, feeds)
        assert len(got) == 1 and got[0].dtype == attention.dtype and got[0].shape == attention.shape
        got = got[0]
        fn = function.run(None, feeds)[0]
        np.testing.assert_allclose(got.astype(np.float32), fn.astype(np.float32), rtol=0, atol=atol)
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=atol)
        valid = attention.astype(np.float32) > 0
        hit = valid & flagged[:, None, None, :]
        same = ~(hit.any(-1) & (valid & ~hit).any(-1))
        assert np.array_equal(got[same], attention[same]), "untouched rows must be bit-identical"
    assert min(counts.values()) > cases // 10, counts
    assert padding_rows > cases // 2, padding_rows  # where v1 and v2 differ


def _v1_v2_disagree(
    rng: np.random.Generator, dtype: type
) -> tuple[np.ndarray, reference.LayerDetector, reference.LayerDetector]:
    """A map with padding query rows and detectors that v1 and v2 flag differently on it: v1's
    detector, and the same for v2 with its own-row features weighted 0, so that only the rows
    counted differ."""
    for _ in range(200):
        attention = random_map(rng, (2, 3, 8, 8), "padded").astype(dtype)
        with v1_reference():
            d1 = with_flags(attention, random_detector_v1(rng, 3), "some", rng)
        if d1 is None:
            continue
        w1 = np.zeros((spec.num_features(3), d1.w1.shape[1]), np.float32)
        w1[: d1.w1.shape[0]] = d1.w1
        d2 = reference.LayerDetector(w1, d1.b1, d1.w2, d1.b2, d1.threshold)
        scores = reference.column_scores(attention, d2)[reference.attended_columns(attention)]
        if np.abs(scores - d2.threshold).min() < 1e-3:
            continue  # v2's flags must not hang on rounding either
        with v1_reference():
            v1_patched = reference.atpatch(attention, d1)[0]
        if not np.array_equal(v1_patched, reference.atpatch(attention, d2)[0]):
            return attention, d1, d2
    pytest.fail("no map and detector where v1 and v2 patch differently")


def test_v1_and_v2_models_run_side_by_side(rng: np.random.Generator) -> None:
    """One library, one process: each model gets its own version's semantics, for both dtypes."""
    for dtype, onnx_type in DTYPES.items():
        a, d1, d2 = _v1_v2_disagree(rng, dtype)
        v1 = _session(standalone_v1(onnx_type, with_function=False), True)
        v2_model = standalone_model(17, onnx_type, 0.0)
        del v2_model.functions[:]
        v2 = _session(v2_model, True)
        atol = 1e-6 if dtype is np.float32 else 1e-3
        feeds_v1 = {"attention": a, "w1": d1.w1, "b1": d1.b1, "w2": d1.w2, "b2": d1.b2}
        feeds_v2 = {"attention": a, "w1": d2.w1, "b1": d2.b1, "w2": d2.w2, "b2": d2.b2}
        with v1_reference():
            want_v1 = reference.atpatch(a, d1)[0]
        for forced in (np.zeros((1, 1), bool), np.ones((2, 1), bool), np.zeros((1, 1), bool)):  # interleaved
            want_v2, want_flags = reference.atpatch(a, d2, forced)
            got_v1 = v1.run(None, feeds_v1)[0]
            np.testing.assert_allclose(got_v1.astype(np.float32), want_v1.astype(np.float32), atol=atol)
            got_v2, flags, _ = v2.run(None, {**feeds_v2, "forced": forced})
            np.testing.assert_allclose(got_v2.astype(np.float32), want_v2.astype(np.float32), atol=atol)
            np.testing.assert_array_equal(flags, want_flags)


def test_v1_and_v2_refuse_each_others_detectors(rng: np.random.Generator) -> None:
    """w1 has 3 rows per head for a v1 node (feature version 2), 6 for a v2 node (feature version 4)."""
    a = random_map(rng, (1, 2, 4, 4), "none")
    d1 = random_detector_v1(rng, 2)
    d2 = random_detector(rng, 2)
    v1 = _session(standalone_v1(with_function=False), True)
    v2_model = standalone_model(17, TensorProto.FLOAT, 0.0)
    del v2_model.functions[:]
    v2 = _session(v2_model, True)
    v1_wants = r"w1 must be \[3 \* heads, hidden\] = \[6, hidden\] .* got \[12,.*feature version 2"
    with pytest.raises(Exception, match=v1_wants):
        v1.run(None, {"attention": a, "w1": d2.w1, "b1": d2.b1, "w2": d2.w2, "b2": d2.b2})
    v2_wants = r"w1 must be \[6 \* heads, hidden\] = \[12, hidden\] .* got \[6,.*feature version 4"
    with pytest.raises(Exception, match=v2_wants):
        nothing = np.zeros((1, 1), bool)
        v2.run(None, {"attention": a, "w1": d1.w1, "b1": d1.b1, "w2": d1.w2, "b2": d1.b2, "forced": nothing})


def test_v1_node_with_v2_arity_is_refused() -> None:
    """A node's arity must be v1's or v2's; anything else is refused when the session is made."""
    model = standalone_v1(with_function=False)
    model.graph.node[0].output.append("flags")  # 5 inputs and 2 outputs: neither version
    model.graph.output.append(helper.make_tensor_value_info("flags", TensorProto.BOOL, None))
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.log_severity_level = 4
    with pytest.raises(Exception, match="this node has 5 inputs and 2 outputs"):
        ort.InferenceSession(model.SerializeToString(), options, providers=CPU)

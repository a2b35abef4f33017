"""AtPatchAttention, the fused op: native kernel == ONNX function == numpy reference, and the rewrite
that puts it in a patched model keeps the model's outputs (to float32 rounding) in both passes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from evalkit_models import feature_detector, random_text_inputs, tiny_text_model
from fused_cases import BIAS_KINDS, FLAG_KINDS, FORCED_KINDS, LAYOUTS, assert_matches, random_case
from graphs import parse

from atpatch.ops import spec
from atpatch.ops.standalone import fused_standalone_model
from atpatch.rewrite import patch_model
from atpatch.rewrite.fuse import fuse_attention
from atpatch.runtime import native

LIBRARY = native.library_path()
needs_kernel = pytest.mark.skipif(
    LIBRARY is None, reason="native kernel not built: run scripts/fetch_ort_headers.sh, then pip install . (or -e .)"
)
FORMS = [pytest.param(True, marks=needs_kernel, id="native"), pytest.param(False, id="function")]


def session(model: onnx.ModelProto, native_kernel: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime warns about initializers the second pass does not read
    if native_kernel:
        options.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("native_kernel", FORMS)
@pytest.mark.parametrize("seed", range(16))
def test_op_equals_reference(native_kernel: bool, seed: int) -> None:
    rng = np.random.default_rng([seed, 7])
    batch, heads, k_len = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(2, 24))
    q_len = k_len if seed % 3 else int(rng.integers(1, k_len + 1))  # self-attention, or the last keys' queries
    case = random_case(
        rng,
        (batch, heads, q_len, k_len),
        depth=int(rng.integers(1, 20)),
        width=int(rng.integers(1, 9)),
        bias=BIAS_KINDS[seed % len(BIAS_KINDS)],
        layout=LAYOUTS[seed % len(LAYOUTS)],
        flags=FLAG_KINDS[(seed // 2) % len(FLAG_KINDS)],
        forced=FORCED_KINDS[seed % len(FORCED_KINDS)],
    )
    outs = session(fused_standalone_model(scale=case.scale), native_kernel).run(None, case.feeds)
    assert outs[0].shape == (batch, heads, q_len, case.feeds["value"].shape[-1])
    assert_matches(outs, case)


@needs_kernel
def test_large_map_runs_on_the_pool_and_matches() -> None:
    """A map past the kernel's inline size runs its phases on onnxruntime's threads."""
    rng = np.random.default_rng(11)
    case = random_case(rng, (2, 4, 96, 96), depth=16, width=16, bias="padding", flags="some", forced="[B,K]")
    assert_matches(session(fused_standalone_model(scale=case.scale), True).run(None, case.feeds), case)


@needs_kernel
@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"key_t": (2, 3, 7, 6)}, "depths or key lengths differ"),
        ({"value": (2, 3, 5, 4)}, "depths or key lengths differ"),
        ({"query": (3, 3, 6, 8)}, "batch do not broadcast"),
        ({"bias": (2, 1, 6, 4)}, "does not broadcast to the map's [2,3,6,6]"),
        ({"query": (1, 2, 3, 6, 8)}, "not of rank 2 to 4"),
        ({"w1": (6, 4)}, "fit a detector for this model"),
        ({"forced": (3, 6)}, "does not broadcast to the map's [batch, k_len]"),
    ],
)
def test_bad_shapes_are_refused_with_the_fix(change: dict[str, tuple[int, ...]], text: str) -> None:
    rng = np.random.default_rng(3)
    case = random_case(rng, (2, 3, 6, 6), depth=8, width=5)
    feeds = dict(case.feeds)
    for name, shape in change.items():
        dtype = bool if name == "forced" else np.float32
        feeds[name] = (rng.random(shape) < 0.5) if dtype is bool else rng.normal(size=shape).astype(np.float32)
    with pytest.raises(Exception, match="AtPatch") as err:
        session(fused_standalone_model(), True).run(None, feeds)
    assert text in str(err.value)
    assert "feed" in str(err.value) or "fit" in str(err.value)


@needs_kernel
def test_empty_map_gives_zero_output_and_no_flags() -> None:
    rng = np.random.default_rng(5)
    case = random_case(rng, (2, 3, 4, 4))
    feeds = dict(case.feeds, key_t=np.zeros((2, 3, 8, 0), np.float32), value=np.zeros((2, 3, 0, 5), np.float32))
    feeds["bias"] = np.zeros((), np.float32)
    output, flags, scores = session(fused_standalone_model(), True).run(None, feeds)
    assert output.shape == (2, 3, 4, 5) and not output.any()
    assert flags.shape == (2, 0) and scores.shape == (2, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto, onnx.ModelProto]:
    """A tiny BERT, patched with cross-layer patching by a detector that flags some columns."""
    folder = tmp_path_factory.mktemp("fused") / "hf"
    model = tiny_text_model(folder)
    patched, _ = patch_model(model.model, feature_detector(2, "mass", 2.0))
    return folder, model.model, patched


def _ops(graph: onnx.GraphProto) -> Counter[str]:
    counts = Counter(n.op_type for n in graph.node)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                counts += _ops(attr.g)
    return counts


def test_rewrite_fuses_both_passes(tiny: tuple[Path, onnx.ModelProto, onnx.ModelProto]) -> None:
    _, _, patched = tiny
    fused, report = fuse_attention(patched)
    onnx.checker.check_model(fused)
    assert (report.fused, report.kept) == (4, 0)  # 2 layers, in pass 1 and in the second pass
    ops = _ops(fused.graph)
    assert ops[spec.FUSED_OP_TYPE] == 4 and ops[spec.OP_TYPE] == 0 and ops["Softmax"] == 0
    assert _ops(patched.graph)[spec.OP_TYPE] == 4  # the input is not modified


@pytest.mark.parametrize("native_kernel", FORMS)
def test_fused_model_equals_unfused(tiny: tuple[Path, onnx.ModelProto, onnx.ModelProto], native_kernel: bool) -> None:
    folder, plain, patched = tiny
    fused, _ = fuse_attention(patched)
    runs = {name: session(m, native_kernel) for name, m in (("plain", plain), ("unfused", patched), ("fused", fused))}
    rng = np.random.default_rng(21)
    changed = 0
    for _ in range(4):
        feeds = random_text_inputs(folder, rng, batch=6, seq=12)
        out = {name: s.run(None, feeds)[0] for name, s in runs.items()}
        np.testing.assert_allclose(out["fused"], out["unfused"], rtol=0, atol=1e-5)
        changed += int((np.abs(out["unfused"] - out["plain"]).max(axis=-1) > 1e-4).sum())
    assert changed > 0, "the detector flagged nothing: the test would not see the second pass"


def test_exposed_map_and_float16_stay_unfused() -> None:
    model = parse("""
    g (float[B,2,S,4] q, float[B,2,4,S] kt, float[B,2,S,4] v) => (float[B,2,S,4] y, float[B,2,S,S] probs) {
        scores = MatMul(q, kt)
        probs = Softmax<axis=-1>(scores)
        y = MatMul(probs, v)
    }""")
    patched, _ = patch_model(model, cross_layer=False)
    fused, report = fuse_attention(patched)
    assert (report.fused, report.kept) == (0, 1)  # the map is a graph output: its chain is kept
    assert "left unfused" in report.summary()
    hidden = parse("""
    g (float[B,2,S,4] q, float[B,2,4,S] kt, float[B,2,S,4] v) => (float[B,2,S,4] y) {
        scores = MatMul(q, kt)
        probs = Softmax<axis=-1>(scores)
        y = MatMul(probs, v)
    }""")
    patched, _ = patch_model(hidden, cross_layer=False)
    assert fuse_attention(patched)[1].fused == 1
    node = next(n for n in patched.graph.node if n.op_type == spec.OP_TYPE)
    node.attribute.append(onnx.helper.make_attribute("map_type", onnx.TensorProto.FLOAT16))
    assert fuse_attention(patched)[1].kept == 1  # a float16 map: the fused kernel is float32


@needs_kernel
def test_coverage_follows_what_the_library_registers_the_fused_op_for(
    tiny: tuple[Path, onnx.ModelProto, onnx.ModelProto],
) -> None:
    fused, _ = fuse_attention(tiny[2])
    assert "CPUExecutionProvider" in native.library_fused_providers(LIBRARY)
    assert native.coverage_problem(fused, ["CPUExecutionProvider"]) is None
    cuda = ["CUDAExecutionProvider"]
    problem = native.coverage_problem(fused, cuda, native.KERNEL_PROVIDERS, ("CPUExecutionProvider",))
    assert problem is not None and "AtPatchAttention kernel covers CPUExecutionProvider, not CUDA" in problem
    assert native.coverage_problem(fused, cuda, native.KERNEL_PROVIDERS, native.KERNEL_PROVIDERS) is None
    old_library = native.coverage_problem(fused, ["CPUExecutionProvider"], fused_covered=())
    assert old_library is not None and "reinstall atpatch" in old_library  # built before the fused op


@pytest.mark.parametrize("optimize", [False, True])
def test_cli_fuse_attention_writes_a_model_that_runs_as_the_unfused_one(
    tiny: tuple[Path, onnx.ModelProto, onnx.ModelProto],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    optimize: bool,
) -> None:
    from atpatch.cli import export_main
    from atpatch.modelio import save_model
    from atpatch.runtime import create_session

    folder, plain, _ = tiny
    save_model(plain, tmp_path / "plain.onnx")
    feature_detector(2, "mass", 2.0).save(tmp_path / "d.safetensors")
    common = [str(tmp_path / "plain.onnx"), "--detector", str(tmp_path / "d.safetensors")]
    common += ["--optimize"] if optimize else []
    assert export_main([*common, "-o", str(tmp_path / "fused.onnx"), "--fuse-attention"]) == 0
    assert "fused 4 attention chains into AtPatchAttention" in capsys.readouterr().out
    assert export_main([*common, "-o", str(tmp_path / "unfused.onnx")]) == 0
    feeds = random_text_inputs(folder, np.random.default_rng(4), batch=6, seq=12)
    want = create_session(tmp_path / "unfused.onnx").run(None, feeds)[0]
    got = create_session(tmp_path / "fused.onnx").run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if optimize else 1e-5)


def test_cli_fuse_attention_needs_a_patched_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from atpatch.cli import export_main

    code = export_main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--no-patch", "--fuse-attention"])
    err = capsys.readouterr().err
    assert code != 0 and "--fuse-attention fuses the AtPatch nodes of a patched model; drop --no-patch" in err
    assert "Traceback" not in err and not (tmp_path / "o.onnx").exists()

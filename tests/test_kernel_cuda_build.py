"""The CUDA-enabled kernel library (CMake option ATPATCH_CUDA) builds here, loads into a CPU-only
onnxruntime, keeps the CPU kernel's results, and says it covers CUDAExecutionProvider.

The device code runs on a GPU only through scripts/gpu_selftest.sh. Here the self-test is built
twice: the CUDA binary (its CPU side is run, and its GPU side where there is one), and the same
self-test with the kernels' own source on a CPU emulation of CUDA (cuda_emulation.h), which
checks the device code's indexing, lanes and arithmetic against the CPU kernel.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from maps import FORCED_KINDS, MASKS_V2, own_row_map, random_detector, random_forced, random_map, with_flags
from onnx import TensorProto

from atpatch.ops import reference, spec
from atpatch.ops.standalone import fused_standalone_model, standalone_model
from atpatch.runtime import native

ROOT = Path(__file__).resolve().parent.parent
CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _nvcc() -> str | None:
    return (
        os.environ.get("CUDACXX")
        or shutil.which("nvcc")
        or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)
    )


def _ort_headers() -> Path | None:
    for d in (os.environ.get("ORT_INCLUDE_DIR"), ROOT / "third_party" / "ort" / "include"):
        if d and (Path(d) / "onnxruntime_cxx_api.h").is_file():
            return Path(d)
    return None


def _skip_reason() -> str | None:
    if _nvcc() is None:
        return "nvcc (CUDA toolkit) not found: the CUDA build option cannot be checked on this machine"
    if shutil.which("cmake") is None:
        return "cmake not found"
    if _ort_headers() is None:
        return "onnxruntime headers not found: run scripts/fetch_ort_headers.sh"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cmake configure + build of the library and the self-test with ATPATCH_CUDA=ON."""
    out = tmp_path_factory.mktemp("cuda_build")
    nvcc = _nvcc()
    assert nvcc is not None
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(out),
        "-DATPATCH_CUDA=ON", "-DATPATCH_CUDA_SELFTEST=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DORT_INCLUDE_DIR={_ort_headers()}",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(out), "-j", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{(result.stdout + result.stderr)[-4000:]}"
    for name in ("libatpatch_ops.so", "atpatch_cuda_selftest", "atpatch_cuda_selftest_emulated"):
        assert (out / name).is_file(), name
    return out


@pytest.fixture(scope="module")
def library(build: Path) -> Path:
    return build / "libatpatch_ops.so"


def feeds(attention: np.ndarray, d: reference.LayerDetector, forced: np.ndarray | None) -> dict[str, np.ndarray]:
    nothing = np.zeros((1, 1), bool)
    return {
        "attention": attention,
        "w1": d.w1,
        "b1": d.b1,
        "w2": d.w2,
        "b2": d.b2,
        "forced": nothing if forced is None else forced,
    }


def test_info_lists_both_providers_and_the_spec_contract(library: Path) -> None:
    info = native.library_info(library)
    assert info["providers"] == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert info["cuda_architectures"] == "90"
    major, minor = str(info["cuda_runtime"]).split(".")
    assert int(major) >= 11 and int(minor) >= 0
    assert (info["domain"], info["op_type"], info["version"]) == (spec.DOMAIN, spec.OP_TYPE, spec.VERSION)
    assert info["versions"] == [1, spec.VERSION]
    assert (tuple(info["inputs"]), tuple(info["outputs"])) == (spec.INPUTS, spec.OUTPUTS)
    assert tuple(info["dtypes"]) == spec.SUPPORTED_DTYPES
    assert info["feature_version"] == spec.FEATURE_VERSION
    assert info["features_per_head"] == spec.FEATURES_PER_HEAD
    assert tuple(info["feature_names"]) == spec.FEATURE_NAMES
    assert (info["v1"]["features_per_head"], info["v1"]["feature_version"]) == (3, 2)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not found")
def test_cuda_runtime_is_linked_statically(library: Path) -> None:
    """No libcudart / libcuda dependency: the library loads where there is no GPU or driver."""
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic  # the parse found the C++ runtime at least
    assert not [n for n in needed if "cuda" in n.lower()], needed


def test_cpu_sessions_with_the_cuda_build_match_the_reference(library: Path, rng: np.random.Generator) -> None:
    """The CUDA build's CPU kernel is the CPU kernel: same results, untouched rows bit-identical."""
    sessions = {}
    for dtype, onnx_type in DTYPES.items():
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library))  # loads in CPU-only onnxruntime
        model = standalone_model(17, onnx_type, 0.0).SerializeToString()
        sessions[dtype] = ort.InferenceSession(model, options, providers=CPU)
    counts: dict[str, int] = {}
    for i in range(400):
        dtype = np.float32 if i % 4 else np.float16
        shape = (1, 1, 1, 1 + i) if i < 3 else tuple(int(x) for x in rng.integers(1, [4, 5, 12, 40]))
        if i % 50 == 49:
            shape = (2, 12, 64, 77)
        attention = random_map(rng, shape, MASKS_V2[i % len(MASKS_V2)]).astype(dtype)  # type: ignore[arg-type]
        how = ("none", "one", "some", "all")[(i // 3) % 4]
        d = with_flags(attention, random_detector(rng, attention.shape[1]), how, rng)
        if d is None:
            how = "none"
            d = with_flags(attention, random_detector(rng, attention.shape[1]), how, rng)
        assert d is not None
        counts[how] = counts.get(how, 0) + 1
        forced = random_forced(rng, shape[0], shape[3], FORCED_KINDS[i % len(FORCED_KINDS)])
        got, flags, _ = sessions[dtype].run(None, feeds(attention, d, forced))
        expected, expected_flags = reference.atpatch(attention, d, forced)
        assert got.dtype == attention.dtype and got.shape == attention.shape
        atol = 1e-6 if dtype is np.float32 else 1e-3
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=atol)
        np.testing.assert_array_equal(flags, expected_flags)
        flagged = expected_flags if forced is None else expected_flags | np.broadcast_to(forced, expected_flags.shape)
        valid = attention.astype(np.float32) > 0
        hit = valid & flagged[:, None, None, :]
        same = ~(hit.any(-1) & (valid & ~hit).any(-1))
        assert np.array_equal(got[same], attention[same]), "untouched rows must be bit-identical"
    assert min(counts.get(h, 0) for h in ("none", "one", "some", "all")) > 20, counts


def test_v1_models_on_the_cuda_build(library: Path) -> None:
    """The CUDA build registers v1 as well: the v1-patched BERT runs on its CPU kernel."""
    import onnx

    data = ROOT / "tests" / "data"
    model = onnx.load(str(data / "v1_patched_bert.onnx"))
    del model.functions[:]  # only the kernel can run it
    with np.load(data / "v1_patched_bert.npz", allow_pickle=False) as z:
        saved = {k: z[k] for k in z.files}
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=CPU)
    logits = sess.run(None, {"input_ids": saved["input_ids"], "attention_mask": saved["attention_mask"]})[0]
    np.testing.assert_allclose(logits, saved["logits"], rtol=0, atol=1e-5)


def test_hostile_inputs_on_the_cuda_build(library: Path) -> None:
    """The hostile-input cases (errors or sane outputs, never a crash) against this build."""
    env = dict(os.environ, ATPATCH_NATIVE_LIBRARY=str(library), PYTHONFAULTHANDLER="1")
    script = Path(__file__).with_name("kernel_hostile_cases.py")
    result = subprocess.run(
        [sys.executable, str(script), "--all"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_coverage_claims_cuda_only_for_a_cuda_build(library: Path, monkeypatch) -> None:
    from atpatch.runtime import session as session_module

    model = standalone_model(17, TensorProto.FLOAT16, 0.0)
    assert native.library_providers(library) == ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert native.coverage_problem(model, CUDA, native.library_providers(library)) is None
    # The default claim (and so a CPU-only library) still sends CUDA sessions to the function.
    problem = native.coverage_problem(model, CUDA)
    assert problem is not None and "CUDAExecutionProvider" in problem and "ATPATCH_CUDA=ON" in problem
    monkeypatch.setenv(native.LIBRARY_ENV_VAR, str(library))
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    assert session_module._choose_native(model, "cuda", CUDA, None) == library
    assert session_module._choose_native(model, "cpu", CPU, None) == library
    # A library that does not say which providers it covers is taken as CPU only.
    assert native._providers_of("/nonexistent/libatpatch_ops.so", 0, 0) == native.COVERED_PROVIDERS
    # The fused op is registered for both providers too: a fused model's CUDA session runs its kernel.
    assert native.library_fused_providers(library) == ("CPUExecutionProvider", "CUDAExecutionProvider")
    covered = native.library_providers(library), native.library_fused_providers(library)
    assert native.coverage_problem(fused_standalone_model(), CUDA, *covered) is None


def test_selftest_binary(build: Path) -> None:
    """The self-test's CPU side passes; its GPU side runs where a GPU is, and says so where not."""
    selftest = str(build / "atpatch_cuda_selftest")
    cpu = subprocess.run([selftest, "--cpu-only", "--cases", "120", "--no-big"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert cpu.returncode == 0 and "RESULT: PASSED" in cpu.stdout, cpu.stdout + cpu.stderr
    for row in ("float32 none", "float32 one", "float32 some", "float32 all", "float16 some", "coverage: forced"):
        assert row in cpu.stdout, cpu.stdout
    assert "own-row case 2;" in cpu.stdout, cpu.stdout  # the targeted case, float32 and float16
    assert "grouped rows: 600 rows bit-identical" in cpu.stdout, cpu.stdout  # the float32 phase 1's fast path
    gpu = subprocess.run([selftest, "--cases", "40", "--no-big", "--no-bench"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    if gpu.returncode == 3:
        assert "no usable CUDA device" in gpu.stderr, gpu.stderr
    else:
        assert gpu.returncode == 0 and "RESULT: PASSED" in gpu.stdout, gpu.stdout + gpu.stderr


def test_device_code_on_the_cpu_emulation_equals_the_cpu_kernel(build: Path) -> None:
    """cuda_kernel.cu's kernels, run by cuda_emulation.h, against core.cc on small random maps
    (all six features of op v2, three of v1, compared before the threshold too)."""
    result = subprocess.run(
        [str(build / "atpatch_cuda_selftest_emulated"), "--cases", "32", "--small", "--no-bench"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "RESULT: PASSED" in result.stdout, report
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("float32 ", "float16 "))]
    assert {f"{r[0]} {r[1]}" for r in rows} == {f"{d} {h}" for d in ("float32", "float16") for h in
                                                ("none", "one", "some", "all")}, report  # fmt: skip
    assert sum(int(r[5]) for r in rows) > 0, report  # some rows were patched
    # forced of every broadcast shape, op v1 and padding query rows were run (else it fails itself)
    assert "coverage: forced [1,1]" in result.stdout and "op v1" in result.stdout, report
    # Op v2's own-row features: detectors that read only them, and the targeted case where they
    # alone tell the columns apart (the device code's flags are the hand-counted ones, float32
    # and float16; tests/maps.py's own_row_map, checked against the reference in test_kernel.py).
    assert "own-row-only detector" in result.stdout and "own-row case 2;" in result.stdout, report
    want = " ".join("".join("1" if x else "0" for x in item) for item in own_row_map()[2])
    for dtype in ("float32", "float16"):
        assert f"own-row case {dtype}: flags {want} (CPU and GPU)" in result.stdout, report
    if platform.machine() in ("x86_64", "AMD64"):
        # No fused multiply-add on either side here: the same operations in the same order.
        assert all(r[7] == "100.0000" for r in rows), report
    # AtPatchAttention's device code (cuda_fused.cu): every bias kind, broadcasts, none/some/all flagged,
    # against the host's map, core.cc's patch and the host's values.
    assert re.search(r"fused \(AtPatchAttention\): \d+ cases, 0 failed", result.stdout), report
    for what in ("fused padding bias", "fused causal bias", "fused broadcast", "fused some flagged"):
        assert what in result.stdout, report

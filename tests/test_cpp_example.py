"""examples/cpp builds with cmake, registers the kernel through the ORT C++ API, and equals Python's outputs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from evalkit_models import random_text_inputs, saved_patched_pair

from atpatch.runtime import create_session, native

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cpp"
NODE_MODULES = ROOT / "examples" / "node" / "node_modules"
HEADERS = Path(os.environ.get("ORT_INCLUDE_DIR", ROOT / "third_party" / "ort" / "include"))
KERNEL = native.library_path()
API_VERSION = 21  # ORT_API_VERSION of the headers (ORT 1.21): the runtime must be at least this new

# The same kernel and graph in two builds of onnxruntime (1.30 linked here, Python's own): float32 rounding only.
ATOL = RTOL = 1e-5


def _ort_library() -> Path | None:
    """libonnxruntime to link: $ORT_LIBRARY, or the one onnxruntime-node ships (scripts/install.sh)."""
    if os.environ.get("ORT_LIBRARY"):
        return Path(os.environ["ORT_LIBRARY"])
    found = sorted(NODE_MODULES.glob("onnxruntime-node/bin/napi-v*/linux/x64/libonnxruntime.so.*"))
    return found[0] if found else None


def _why_not_buildable() -> str | None:
    if shutil.which("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return "cmake or a C++ compiler is not installed"
    if not (HEADERS / "onnxruntime_cxx_api.h").is_file():
        return f"onnxruntime C++ headers not in {HEADERS}: run scripts/fetch_ort_headers.sh"
    if KERNEL is None:
        return "native kernel not built: run scripts/fetch_ort_headers.sh, then pip install . (or -e .)"
    if _ort_library() is None and shutil.which("npm") is None:
        return "no libonnxruntime to link: npm is absent (install.sh gets one with onnxruntime-node), no ORT_LIBRARY"
    return None


pytestmark = pytest.mark.skipif(_why_not_buildable() is not None, reason=str(_why_not_buildable()))


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    library = _ort_library()
    if library is None:
        pytest.fail(f"onnxruntime-node is not installed in {NODE_MODULES.parent}: run scripts/install.sh")
    build = tmp_path_factory.mktemp("cpp-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake",
        "-S",
        str(EXAMPLE),
        "-B",
        str(build),
        *generator,
        f"-DORT_INCLUDE_DIR={HEADERS}",
        f"-DORT_LIBRARY={library}",
    ]
    for command in (configure, ["cmake", "--build", str(build)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    return build / "run_patched"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random BERT, plain and patched with a detector that flags high-mass columns."""
    return saved_patched_pair(tmp_path_factory.mktemp("cpp"))


def _write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    with path.open("w") as f:
        for name, value in tensors.items():
            f.write(f"{name} {value.dtype} {value.ndim} {' '.join(map(str, value.shape))}\n")
            f.write(" ".join(map(str, value.ravel().tolist())) + "\n")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    tokens = path.read_text().split()
    tensors, i = {}, 0
    while i < len(tokens):
        name, dtype, rank = tokens[i], tokens[i + 1], int(tokens[i + 2])
        dims = [int(t) for t in tokens[i + 3 : i + 3 + rank]]
        count = int(np.prod(dims))
        start = i + 3 + rank
        tensors[name] = np.array(tokens[start : start + count], dtype=np.float64).astype(dtype).reshape(dims)
        i = start + count
    return tensors


def _run(program: Path, model: Path, library: str, inputs: dict[str, np.ndarray], work: Path) -> np.ndarray:
    _write_tensors(work / "inputs.txt", inputs)
    command = [str(program), str(model), library, str(work / "inputs.txt"), str(work / "outputs.txt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    version = re.match(r"onnxruntime (\d+)\.(\d+)", result.stdout)
    assert version is not None and int(version[2]) >= API_VERSION, result.stdout  # the headers' API is served
    outputs = _read_tensors(work / "outputs.txt")
    assert list(outputs) == ["logits"] and outputs["logits"].dtype == np.float32
    return outputs["logits"]


def test_cpp_example_with_the_kernel_registered_equals_python_kernel(
    program: Path, models: dict[str, Path], rng: np.random.Generator, tmp_path: Path
) -> None:
    inputs = random_text_inputs(models["hf"], rng)
    cpp = _run(program, models["patched"], str(KERNEL), inputs, tmp_path)
    python = create_session(models["patched"], use_native=True).run(None, inputs)[0]
    assert cpp.shape == python.shape == (3, 2)
    np.testing.assert_allclose(cpp, python, rtol=RTOL, atol=ATOL)
    # The detector flags columns on these inputs, so the equality above covers the kernel's patching.
    plain = create_session(models["plain"]).run(None, inputs)[0]
    assert np.abs(plain - python).max() > 100 * ATOL


def test_cpp_example_without_a_library_runs_the_function_and_equals_python(
    program: Path, models: dict[str, Path], rng: np.random.Generator, tmp_path: Path
) -> None:
    inputs = random_text_inputs(models["hf"], rng, batch=2, seq=9)
    cpp = _run(program, models["patched"], "-", inputs, tmp_path)
    python = create_session(models["patched"], use_native=False).run(None, inputs)[0]
    np.testing.assert_allclose(cpp, python, rtol=RTOL, atol=ATOL)


def test_cpp_example_refuses_a_model_whose_op_has_no_kernel_or_function(program: Path, tmp_path: Path) -> None:
    """Without the library, a bare AtPatch node (no function in the file) fails with onnxruntime's message."""
    model = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 17, "ai.atpatch" : 1]>
        g (float[1, 1, 2, 2] x) => (float[1, 1, 2, 2] y) { y = ai.atpatch.AtPatch(x) }"""
    )
    onnx.save(model, str(tmp_path / "bare.onnx"))
    _write_tensors(tmp_path / "in.txt", {"x": np.full((1, 1, 2, 2), 0.5, np.float32)})
    command = [str(program), str(tmp_path / "bare.onnx"), "-", str(tmp_path / "in.txt"), str(tmp_path / "out.txt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("run_patched: error:") and "AtPatch" in result.stderr
    assert not (tmp_path / "out.txt").exists()

"""atpatch-export --triton: a model repository whose config parses as Triton's ModelConfig and whose model runs."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path
from types import ModuleType

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from evalkit_models import feature_detector
from google.protobuf import text_format
from onnx import TensorProto, helper

from atpatch.cli import export_main
from atpatch.errors import AtPatchError
from atpatch.ops import spec
from atpatch.runtime import create_session, native
from atpatch.serving import write_repository

KERNEL = native.library_path()
needs_kernel = pytest.mark.skipif(
    KERNEL is None, reason="native kernel not built: run scripts/fetch_ort_headers.sh, then pip install . (or -e .)"
)
HEADS = 3  # of graphs.attention_and_classifier


def _model_config_pb2() -> ModuleType:
    """Triton's compiled model_config.proto, as tritonclient ships it.

    Loaded from its file: importing tritonclient.grpc would import grpc, which is not installed.
    """
    found = importlib.util.find_spec("tritonclient")
    if found is None or not found.submodule_search_locations:
        pytest.fail("tritonclient is not installed: run scripts/install.sh (pip install --no-deps tritonclient)")
    path = Path(next(iter(found.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pb2() -> ModuleType:
    return _model_config_pb2()


def _parse(pb2: ModuleType, path: Path):  # noqa: ANN202 (a generated message class)
    # text_format.Parse rejects unknown fields, bad enum names and malformed syntax.
    return text_format.Parse(path.read_text(), pb2.ModelConfig())


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """An attention graph and a detector that flags its high-mass key columns."""
    onnx.save(graphs.attention_and_classifier(), str(tmp_path / "attn.onnx"))
    feature_detector(1, "mass", 1.5, heads=HEADS).save(tmp_path / "detector.safetensors")
    return {"model": tmp_path / "attn.onnx", "detector": tmp_path / "detector.safetensors"}


def _feeds(rng: np.random.Generator, batch: int = 2, seq: int = 7, depth: int = 4) -> dict[str, np.ndarray]:
    shape = (batch, HEADS, seq, depth)
    # Large scores give peaked attention, so some columns get far more than their share and are flagged.
    return {
        "q": rng.normal(0, 3, shape).astype(np.float32),
        "k": rng.normal(0, 3, shape).astype(np.float32),
        "v": rng.normal(0, 1, shape).astype(np.float32),
        "cls": rng.normal(0, 1, (batch, 5)).astype(np.float32),
    }


def _dims(pb2: ModuleType, config, kind: str) -> dict[str, tuple[str, list[int]]]:  # noqa: ANN001
    return {t.name: (pb2.DataType.Name(t.data_type), list(t.dims)) for t in getattr(config, kind)}


@needs_kernel
def test_repository_config_parses_as_triton_model_config_and_registers_the_copied_kernel(
    files: dict[str, Path], pb2: ModuleType, tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture
) -> None:
    repo = tmp_path / "repo"
    args = [str(files["model"]), "--detector", str(files["detector"]), "--triton", str(repo)]
    assert export_main([*args, "-o", str(tmp_path / "attn.patched.onnx")]) == 0
    assert f"tritonserver --model-repository {repo.resolve()}" in capsys.readouterr().out

    folder = repo / "attn_patched"  # named after -o
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "attn_patched",
        "attn_patched/1",
        "attn_patched/1/model.onnx",
        "attn_patched/config.pbtxt",
        f"attn_patched/{KERNEL.name}",
    ]
    config = _parse(pb2, folder / "config.pbtxt")
    assert config.name == "attn_patched" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 0 and config.default_model_filename == "model.onnx"
    assert _dims(pb2, config, "input") == {name: ("TYPE_FP32", [-1, 3, -1, -1]) for name in "qkv"} | {
        "cls": ("TYPE_FP32", [-1, -1])
    }
    assert _dims(pb2, config, "output") == {"y": ("TYPE_FP32", [-1, 3, -1, -1]), "p": ("TYPE_FP32", [-1, -1])}
    assert [pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_CPU"]
    (library,) = config.model_operations.op_library_filename
    assert library == str((folder / KERNEL.name).resolve())
    assert filecmp.cmp(library, KERNEL, shallow=False)

    # What Triton's onnxruntime backend does: register each op_library_filename, load the model file.
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    served = ort.InferenceSession(str(folder / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    assert sum(n.op_type == spec.OP_TYPE for n in onnx.load(str(folder / "1" / "model.onnx")).graph.node) == 1
    feeds = _feeds(rng)
    y_served = served.run(["y"], feeds)[0]
    y_function = create_session(tmp_path / "attn.patched.onnx", use_native=False).run(["y"], feeds)[0]
    np.testing.assert_allclose(y_served, y_function, rtol=1e-5, atol=1e-6)
    y_plain = ort.InferenceSession(str(files["model"]), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    assert np.abs(y_plain - y_served).max() > 1e-3  # columns were flagged: the kernel did patch


@needs_kernel
def test_mount_names_the_library_where_the_server_will_see_it(
    files: dict[str, Path], pb2: ModuleType, tmp_path: Path
) -> None:
    args = [str(files["model"]), "--triton", str(tmp_path / "repo"), "--triton-name", "bert.v2"]
    assert export_main([*args, "--triton-mount", "/models"]) == 0
    config = _parse(pb2, tmp_path / "repo" / "bert.v2" / "config.pbtxt")
    assert config.name == "bert.v2"
    assert list(config.model_operations.op_library_filename) == [f"/models/bert.v2/{KERNEL.name}"]
    assert not (tmp_path / "attn.patched.onnx").exists()  # no -o: the repository only


def test_without_the_kernel_the_repository_serves_the_onnx_function(
    files: dict[str, Path],
    pb2: ModuleType,
    tmp_path: Path,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv(native.LIBRARY_ENV_VAR, str(tmp_path / "missing.so"))  # library_path() -> None
    repo = tmp_path / "repo"
    assert export_main([str(files["model"]), "--detector", str(files["detector"]), "--triton", str(repo)]) == 0
    assert "native kernel is not built" in capsys.readouterr().out
    config = _parse(pb2, repo / "attn" / "config.pbtxt")  # named after the input
    assert not config.HasField("model_operations") and not config.instance_group
    assert not list((repo / "attn").glob("*.so"))
    feeds = _feeds(rng)
    served = ort.InferenceSession(str(repo / "attn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(files["model"]), providers=["CPUExecutionProvider"])
    assert np.abs(served.run(["y"], feeds)[0] - plain.run(["y"], feeds)[0]).max() > 1e-3  # the function patched


def test_a_non_empty_folder_is_refused_and_left_as_it_was(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "other").write_text("someone else's model\n")
    out = tmp_path / "out.onnx"
    assert export_main([str(files["model"]), "-o", str(out), "--triton", str(repo)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not an empty folder" in err and "--triton" in err
    assert [p.name for p in repo.iterdir()] == ["other"] and not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to write: give -o FILE, --triton DIR, or both"),
        (["-o", "x.onnx", "--triton-name", "m"], "add --triton DIR"),
        (["--triton", "repo", "--triton-name", "a/b"], "is not a usable Triton model name"),
        (["--triton", "repo", "--triton-mount", "models"], "is not an absolute path"),
        (["--triton", "repo", "-o", "repo/x.onnx"], "is inside the --triton folder"),
    ],
)
def test_bad_triton_arguments_give_one_line_errors_and_write_nothing(
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo").mkdir()  # empty: allowed as a repository
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert export_main([str(files["model"]), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_failed_write_leaves_no_repository_and_no_staging(tmp_path: Path) -> None:
    """An input whose shape Triton cannot be told about fails after the model is staged: nothing remains."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(AtPatchError, match="graph input 'x' has no shape"):
        write_repository(model, tmp_path / "repo", "relu", None)
    assert list(tmp_path.iterdir()) == []

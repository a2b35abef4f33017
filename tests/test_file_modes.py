"""What atpatch writes is readable by others, as open() would make it under the umask: a server
running as another user (Triton, a web service) must be able to read the patched model."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from evalkit_models import sentences, tiny_text_model

EXPORT = "import sys; from atpatch.cli import export_main; sys.exit(export_main())"
ATPATCH = "import sys; from atpatch.cli import main; sys.exit(main())"


def _run(code: str, args: list[str], umask: int) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert result.returncode == 0, result.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("modes")
    tiny = tiny_text_model(d / "hf")
    onnx.save(tiny.model, str(d / "model.onnx"))
    rng = np.random.default_rng()
    rows = [{"text": t, "label": int(rng.integers(2))} for t in sentences(24, rng)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": d / "model.onnx", "hf": d / "hf", "data": d / "data.jsonl"}


def test_model_detector_culprits_and_triton_repository_are_readable_by_others(
    model: dict[str, Path], tmp_path: Path
) -> None:
    m, hf, data = str(model["model"]), str(model["hf"]), str(model["data"])
    _run(EXPORT, [m, "-o", str(tmp_path / "m.patched.onnx")], 0o022)
    _run(ATPATCH, ["fit", m, "--hf", hf, "--clean", data, "-o", str(tmp_path / "d.safetensors")], 0o022)
    _run(ATPATCH, ["localize", m, "--hf", hf, "--data", data, "-o", str(tmp_path / "c.jsonl"), "--budget", "4"], 0o022)
    _run(EXPORT, [m, "--triton", str(tmp_path / "repo"), "--triton-name", "bert"], 0o022)
    files = ["m.patched.onnx", "d.safetensors", "c.jsonl", "repo/bert/1/model.onnx", "repo/bert/config.pbtxt"]
    for name in files:
        assert _mode(tmp_path / name) & 0o777 == 0o644, f"{name}: {oct(_mode(tmp_path / name))}"
    for name in ("repo", "repo/bert", "repo/bert/1"):
        assert _mode(tmp_path / name) == 0o755, f"{name}: {oct(_mode(tmp_path / name))}"


def test_a_private_umask_is_respected_too(model: dict[str, Path], tmp_path: Path) -> None:
    _run(EXPORT, [str(model["model"]), "-o", str(tmp_path / "m.patched.onnx")], 0o077)
    _run(EXPORT, [str(model["model"]), "--triton", str(tmp_path / "repo")], 0o077)
    assert _mode(tmp_path / "m.patched.onnx") == 0o600
    assert _mode(tmp_path / "repo") == 0o700 and _mode(tmp_path / "repo" / "model" / "1" / "model.onnx") == 0o600

"""atpatch-export as a user meets it: a clear one-line error and nothing written on bad input."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import graphs
import onnx
import pytest

from atpatch.cli import export_main
from atpatch.detector import Detector
from atpatch.rewrite import patch_model


def _write(path: Path, model: onnx.ModelProto) -> Path:
    onnx.save(model, str(path))
    return path


def _not_onnx(d: Path) -> Path:
    (d / "notes.onnx").write_text("this is a text file, not a model\n")
    return d / "notes.onnx"


def _truncated(d: Path) -> Path:
    data = graphs.attention_and_classifier().SerializeToString()
    (d / "cut.onnx").write_bytes(data[: len(data) // 2])
    return d / "cut.onnx"


BAD_MODELS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not an ONNX file": (_not_onnx, "not"),
    "truncated file": (_truncated, "not"),
    "no attention": (lambda d: _write(d / "plain.onnx", graphs.decoys_only()), "no attention softmax"),
    "com.microsoft GroupQueryAttention op": (
        lambda d: _write(d / "fused.onnx", graphs.group_query_attention_op()),
        "fused into com.microsoft::GroupQueryAttention",
    ),
    "com.microsoft Attention": (
        lambda d: _write(d / "ms.onnx", graphs.ms_attention_op()),
        "fused into com.microsoft::Attention",
    ),
    "already patched": (
        lambda d: _write(d / "twice.onnx", patch_model(graphs.attention_and_classifier())[0]),
        "already patched",
    ),
    "missing file": (lambda d: d / "absent.onnx", "does not exist"),
}


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _assert_one_line_error(capsys: pytest.CaptureFixture[str], code: int, expected: str) -> None:
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("atpatch-export: error: "), err
    assert expected in err, err


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_gives_one_line_error_and_writes_nothing(case: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    make, expected = BAD_MODELS[case]
    model = make(tmp_path)
    before = _snapshot(tmp_path)
    code = export_main([str(model), "-o", str(tmp_path / "out.onnx")])
    _assert_one_line_error(capsys, code, expected)
    assert _snapshot(tmp_path) == before


def test_output_path_equal_to_input_is_refused(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    model = _write(tmp_path / "m.onnx", graphs.attention_and_classifier())
    before = _snapshot(tmp_path)
    code = export_main([str(model), "-o", str(tmp_path / "." / "m.onnx")])
    _assert_one_line_error(capsys, code, "is the input file")
    assert _snapshot(tmp_path) == before


def test_detector_for_another_model_is_refused_and_nothing_written(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    model = _write(tmp_path / "m.onnx", graphs.attention_and_classifier())
    Detector.pass_through([2] * 12).save(tmp_path / "d.safetensors")
    before = _snapshot(tmp_path)
    code = export_main([str(model), "-o", str(tmp_path / "out.onnx"), "--detector", str(tmp_path / "d.safetensors")])
    _assert_one_line_error(capsys, code, "12 layers but this model has 1 attention layers")
    assert _snapshot(tmp_path) == before


def test_patching_writes_a_checked_model_and_a_summary(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    model = _write(tmp_path / "m.onnx", graphs.attention_and_classifier())
    original = model.read_bytes()
    assert export_main([str(model), "-o", str(tmp_path / "m.patched.onnx")]) == 0
    out = capsys.readouterr().out
    assert "patched 1 attention layers" in out and "pass-through" in out and "opset 17" in out
    assert f"wrote {tmp_path / 'm.patched.onnx'}" in out
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.patched.onnx")), full_check=True)
    assert model.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.patched.onnx"]  # no temp files left


def test_help_explains_the_command_to_a_newcomer() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from atpatch.cli import export_main; sys.exit(export_main())",
            "--help",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "atpatch-export model.onnx -o model.patched.onnx" in result.stdout
    assert "--hf" in result.stdout and "pass-through" in result.stdout


def test_importing_atpatch_does_not_import_torch() -> None:
    code = (
        "import sys, atpatch, atpatch.rewrite, atpatch.runtime, atpatch.ops.function, atpatch.detector, atpatch.cli;"
        "import atpatch.exporter; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_a_reader_that_closes_early_gets_no_traceback() -> None:
    # `atpatch doctor | head -1`: the pipe closes before atpatch prints (python starts slower).
    child = subprocess.Popen(
        [sys.executable, "-m", "atpatch.cli", "doctor"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_per_layer_export_says_what_of_the_detector_it_leaves_out(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The joint rule and the spread act only through the cross-layer second pass: --per-layer drops them,
    and says so, instead of writing a model that quietly flags less than `atpatch fit` measured."""
    from dataclasses import replace

    from atpatch.ops.joint import JointRule

    model = _write(tmp_path / "m.onnx", graphs.attention_and_classifier())
    heads = patch_model(graphs.attention_and_classifier())[1][0].heads
    detector = replace(Detector.pass_through([heads]), joint=JointRule((1.0,), 3.0), spread=1)
    detector.save(tmp_path / "d.safetensors")
    for extra, noted in (([], False), (["--per-layer"], True)):
        out_path = tmp_path / f"out{len(extra)}.onnx"
        args = [str(model), "-o", str(out_path), "--detector", str(tmp_path / "d.safetensors"), *extra]
        assert export_main(args) == 0
        out = capsys.readouterr().out
        assert ("note: --per-layer" in out) == noted, out
        if noted:
            assert "joint rule over layers and spread (1) act only through" in out and "drop --per-layer" in out
            assert "every layer of this detector is off" not in out  # its layers are on (a threshold of 0)
    # A detector whose layers calibration switched off flags through the joint rule alone.
    from atpatch.detector.calibrate import NEVER

    off = replace(detector, layers=tuple(replace(layer, threshold=NEVER) for layer in detector.layers))
    off.save(tmp_path / "off.safetensors")
    args = [str(model), "-o", str(tmp_path / "off.onnx"), "--detector", str(tmp_path / "off.safetensors")]
    assert export_main([*args, "--per-layer"]) == 0
    assert "every layer of this detector is off, so this model flags nothing" in capsys.readouterr().out

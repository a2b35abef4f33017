"""Bad input as a new user meets it, each case run as its own process: exit code 1, one line on
stderr naming the problem and the fix, no traceback, and nothing written (temp files included).

The inputs are a tiny random BERT with its Hugging Face folder, graphs that cannot be patched,
and data files broken in the ways users break them; `-o` always points into an empty folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import graphs
import numpy as np
import onnx
import pytest
from evalkit_models import sentences, tiny_text_model

from atpatch.detector import Detector
from atpatch.modelio import model_fingerprint
from atpatch.rewrite import patch_model

EXPORT = "import sys; from atpatch.cli import export_main; sys.exit(export_main())"
ATPATCH = "import sys; from atpatch.cli import main; sys.exit(main())"


def _unwritable(d: Path) -> Path:
    """A folder this process cannot create files in: root writes through modes, but not into sysfs."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = d / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng()
    tiny = tiny_text_model(d / "hf")
    onnx.save(tiny.model, str(d / "model.onnx"))
    onnx.save(patch_model(tiny.model)[0], str(d / "model.patched.onnx"))
    other = onnx.load(str(d / "model.onnx"))  # the same architecture with one weight changed
    weights = other.graph.initializer[0]
    weights.raw_data = bytes(reversed(weights.raw_data))
    onnx.save(other, str(d / "other.onnx"))
    onnx.save(patch_model(other)[0], str(d / "other.patched.onnx"))

    onnx.save(graphs.attention_and_classifier(), str(d / "attn.onnx"))
    onnx.save(graphs.decoys_only(), str(d / "plain.onnx"))
    onnx.save(graphs.group_query_attention_op(), str(d / "gqa.onnx"))
    onnx.save(patch_model(graphs.attention_and_classifier())[0], str(d / "twice.onnx"))
    (d / "notes.onnx").write_text("this is a text file, not a model\n")
    data = graphs.attention_and_classifier().SerializeToString()
    (d / "cut.onnx").write_bytes(data[: len(data) // 2])

    Detector.pass_through([2] * 12).save(d / "det12.safetensors")
    layers = Detector.pass_through([4, 4]).layers
    Detector(layers, "supervised", model_fingerprint(other)).save(d / "det-other.safetensors")
    (d / "garbage.safetensors").write_bytes(rng.bytes(256))

    clean = [{"text": t, "label": int(rng.integers(2))} for t in sentences(12, rng)]
    lines = "".join(json.dumps(r) + "\n" for r in clean)
    (d / "clean.jsonl").write_text(lines)
    (d / "utf16.jsonl").write_bytes(lines.encode("utf-16"))
    (d / "broken.jsonl").write_text(lines + '{"text": "cut off", "label"\n')
    (d / "nolabel.jsonl").write_text(json.dumps({"text": "good film"}) + "\n")
    (d / "data.csv").write_text("text,label\ngood film,1\n")
    np.savez(d / "imgs.npz", pixel_values=rng.normal(size=(6, 3, 16, 16)).astype(np.float32), labels=np.ones(6, int))
    (d / "culprits-other.jsonl").write_text(
        json.dumps({"data": "0123456789abcdef", "index": 0, "positions": [1], "restored": True}) + "\n"
    )
    (d / "empty-hf").mkdir()
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("not empty\n")
    return {"dir": d, "ro": _unwritable(d)}


# (program, arguments, what the message must say). {d}: the inputs' folder, {out}: an empty
# folder for outputs, {ro}: a folder that cannot be written to.
M, HF = "{d}/model.onnx", "--hf {d}/hf"
CASES: dict[str, tuple[str, str, str]] = {
    # atpatch-export: the model
    "export: not an ONNX file": (EXPORT, "{d}/notes.onnx -o {out}/x.onnx", "is not a readable ONNX model"),
    "export: truncated file": (EXPORT, "{d}/cut.onnx -o {out}/x.onnx", "is not a readable ONNX model"),
    "export: missing file": (EXPORT, "{d}/absent.onnx -o {out}/x.onnx", "does not exist"),
    "export: no attention": (EXPORT, "{d}/plain.onnx -o {out}/x.onnx", "no attention softmax"),
    "export: fused GroupQueryAttention": (EXPORT, "{d}/gqa.onnx -o {out}/x.onnx", "GroupQueryAttention"),
    "export: already patched": (EXPORT, "{d}/twice.onnx -o {out}/x.onnx", "already patched"),
    "export: two models": (EXPORT, f"{M} {HF} -o {{out}}/x.onnx", "give exactly one model"),
    # atpatch-export: where to write
    "export: nothing to write": (EXPORT, M, "nothing to write"),
    "export: -o is the input": (EXPORT, f"{M} -o {{d}}/./model.onnx", "is the input file"),
    "export: -o in a missing folder": (EXPORT, f"{M} -o {{out}}/no/x.onnx", "does not exist"),
    "export: -o is a folder": (EXPORT, f"{M} -o {{out}}", "is a folder"),
    "export: -o in a read-only folder": (EXPORT, f"{M} -o {{ro}}/x.onnx", "write"),
    "export: --triton folder not empty": (EXPORT, f"{M} --triton {{d}}/full", "not an empty folder"),
    "export: --triton in a read-only folder": (EXPORT, f"{M} --triton {{ro}}/repo", "write"),
    "export: --triton-name without --triton": (EXPORT, f"{M} -o {{out}}/x.onnx --triton-name m", "add --triton"),
    "export: --triton-mount not absolute": (EXPORT, f"{M} --triton {{out}}/r --triton-mount rel", "not an absolute"),
    "export: bad --triton-name": (EXPORT, f"{M} --triton {{out}}/r --triton-name ../up", "not a usable Triton"),
    # atpatch-export: the detector
    "export: detector for another layer count": (
        EXPORT,
        f"{M} -o {{out}}/x.onnx --detector {{d}}/det12.safetensors",
        "12 layers but this model has 2",
    ),
    "export: detector fitted on another model": (
        EXPORT,
        f"{M} -o {{out}}/x.onnx --detector {{d}}/det-other.safetensors",
        "was fitted for model",
    ),
    "export: detector file missing": (EXPORT, f"{M} -o {{out}}/x.onnx --detector {{d}}/no.safetensors", "not exist"),
    "export: detector file garbage": (
        EXPORT,
        f"{M} -o {{out}}/x.onnx --detector {{d}}/garbage.safetensors",
        "detector",
    ),
    "export: --no-patch with --detector": (
        EXPORT,
        f"{HF} --no-patch -o {{out}}/x.onnx --detector {{d}}/det12.safetensors",
        "drop --detector",
    ),
    # atpatch-export --hf: options
    "export: --opset 5": (EXPORT, f"{HF} -o {{out}}/x.onnx --opset 5", "--opset 5 is outside"),
    "export: --opset 99": (EXPORT, f"{HF} -o {{out}}/x.onnx --opset 99", "--opset 99 is outside"),
    "export: --opset -1": (EXPORT, f"{HF} -o {{out}}/x.onnx --opset -1", "--opset -1 is outside"),
    "export: --opset 26, past the TorchScript exporter": (
        EXPORT,
        f"{HF} -o {{out}}/x.onnx --opset 26",
        "torch.onnx could not export",
    ),
    "export: --opset 14": (EXPORT, f"{HF} -o {{out}}/x.onnx --opset 14", "--opset 14 is outside 15..26"),
    "export: --opset on an ONNX file": (EXPORT, f"{M} -o {{out}}/x.onnx --opset 18", "--hf exports only"),
    "export: --hf folder without config": (EXPORT, "--hf {d}/empty-hf -o {out}/x.onnx", "config.json"),
    # atpatch localize
    "localize: --budget 0": (
        ATPATCH,
        f"localize {M} {HF} --data {{d}}/clean.jsonl -o {{out}}/c.jsonl --budget 0",
        "--budget 0",
    ),
    "localize: --budget -3": (
        ATPATCH,
        f"localize {M} {HF} --data {{d}}/clean.jsonl -o {{out}}/c.jsonl --budget -3",
        "--budget -3",
    ),
    "localize: UTF-16 data": (ATPATCH, f"localize {M} {HF} --data {{d}}/utf16.jsonl -o {{out}}/c.jsonl", "UTF-8"),
    "localize: a line of invalid JSON": (
        ATPATCH,
        f"localize {M} {HF} --data {{d}}/broken.jsonl -o {{out}}/c.jsonl",
        "line 13: invalid JSON",
    ),
    "localize: no label": (ATPATCH, f"localize {M} {HF} --data {{d}}/nolabel.jsonl -o {{out}}/c.jsonl", '"label"'),
    "localize: unknown data format": (ATPATCH, f"localize {M} {HF} --data {{d}}/data.csv -o {{out}}/c.jsonl", ".csv"),
    "localize: images for a text model": (
        ATPATCH,
        f"localize {M} {HF} --data {{d}}/imgs.npz -o {{out}}/c.jsonl",
        "the model takes input_ids",
    ),
    "localize: a patched model": (
        ATPATCH,
        f"localize {{d}}/model.patched.onnx {HF} --data {{d}}/clean.jsonl -o {{out}}/c.jsonl",
        "already patched",
    ),
    "localize: -o is the data": (ATPATCH, f"localize {M} {HF} --data {{d}}/clean.jsonl -o {{d}}/clean.jsonl", "input"),
    "localize: --hf without config": (
        ATPATCH,
        f"localize {M} --hf {{d}}/empty-hf --data {{d}}/clean.jsonl -o {{out}}/c.jsonl",
        "no config.json",
    ),
    # atpatch fit
    "fit: --budget -5": (
        ATPATCH,
        f"fit {M} {HF} --clean {{d}}/clean.jsonl --misbehaving {{d}}/clean.jsonl -o {{out}}/d.safetensors --budget -5",
        "--budget -5",
    ),
    "fit: images for a text model": (
        ATPATCH,
        f"fit {M} {HF} --clean {{d}}/imgs.npz -o {{out}}/d.safetensors",
        "the model takes input_ids",
    ),
    "fit: a patched model": (
        ATPATCH,
        f"fit {{d}}/model.patched.onnx {HF} --clean {{d}}/clean.jsonl -o {{out}}/d.safetensors",
        "already patched",
    ),
    "fit: -o in a read-only folder": (
        ATPATCH,
        f"fit {M} {HF} --clean {{d}}/clean.jsonl -o {{ro}}/d.safetensors",
        "write",
    ),
    "fit: --target-flag-rate 2": (
        ATPATCH,
        f"fit {M} {HF} --clean {{d}}/clean.jsonl -o {{out}}/d.safetensors --target-flag-rate 2",
        "between 0 and 1",
    ),
    "fit: --culprits without --misbehaving": (
        ATPATCH,
        f"fit {M} {HF} --clean {{d}}/clean.jsonl --culprits {{d}}/culprits-other.jsonl -o {{out}}/d.safetensors",
        "add --misbehaving",
    ),
    "fit: --culprits for another data file": (
        ATPATCH,
        f"fit {M} {HF} --clean {{d}}/clean.jsonl --misbehaving {{d}}/clean.jsonl "
        "--culprits {d}/culprits-other.jsonl -o {out}/d.safetensors",
        "another data file",
    ),
    "fit: missing --clean file": (
        ATPATCH,
        f"fit {M} {HF} --clean {{d}}/no.jsonl -o {{out}}/d.safetensors",
        "not exist",
    ),
    # atpatch eval
    "eval: patched from another model": (
        ATPATCH,
        f"eval {M} {{d}}/other.patched.onnx {HF} --clean {{d}}/clean.jsonl",
        "patched from another model",
    ),
    "eval: the second model is not patched": (
        ATPATCH,
        f"eval {M} {{d}}/other.onnx {HF} --clean {{d}}/clean.jsonl",
        "carries no AtPatch node",
    ),
    "eval: the models swapped": (
        ATPATCH,
        f"eval {{d}}/model.patched.onnx {M} {HF} --clean {{d}}/clean.jsonl",
        "carries no AtPatch node",
    ),
    "eval: --triggered without --target": (
        ATPATCH,
        f"eval {M} {{d}}/model.patched.onnx {HF} --clean {{d}}/clean.jsonl --triggered {{d}}/clean.jsonl",
        "--target",
    ),
    "eval: --target not a label": (
        ATPATCH,
        f"eval {M} {{d}}/model.patched.onnx {HF} --clean {{d}}/clean.jsonl --triggered {{d}}/clean.jsonl "
        "--target neutral",
        "is not one of the model's labels",
    ),
    "eval: --json in a read-only folder": (
        ATPATCH,
        f"eval {M} {{d}}/model.patched.onnx {HF} --clean {{d}}/clean.jsonl --json {{ro}}/e.json",
        "write",
    ),
    # atpatch explain
    "explain: an unpatched model": (
        ATPATCH,
        f"explain {M} {HF} --data {{d}}/clean.jsonl -o {{out}}/w.png",
        "carries no AtPatch node",
    ),
    "explain: --index out of range": (
        ATPATCH,
        f"explain {{d}}/model.patched.onnx {HF} --data {{d}}/clean.jsonl --index 99 -o {{out}}/w.png",
        "out of range",
    ),
    "explain: -o not a PNG": (
        ATPATCH,
        f"explain {{d}}/model.patched.onnx {HF} --data {{d}}/clean.jsonl -o {{out}}/w.jpg",
        ".png",
    ),
    # atpatch demo
    "demo: --dir is a file": (ATPATCH, "demo --dir {d}/clean.jsonl", "is a file"),
}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())  # hidden temp files included


def _run(code: str, args: list[str], cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_error_with_nothing_written(case: str, kit: dict[str, Path], tmp_path: Path) -> None:
    code, args, expected = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    argv = args.format(d=kit["dir"], out=out, ro=kit["ro"]).split()
    watched = [kit["dir"], kit["ro"], out]
    before = [_listing(f) for f in watched]
    result = _run(code, argv, tmp_path)
    prog = "atpatch-export" if code == EXPORT else f"atpatch {argv[0]}"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{prog}: error: "), result.stderr
    assert expected in result.stderr, result.stderr
    assert [_listing(f) for f in watched] == before
    assert _listing(tmp_path) == ["out"]


def test_no_message_says_the_same_thing_twice(kit: dict[str, Path], tmp_path: Path) -> None:
    for case in ("eval: the second model is not patched", "explain: an unpatched model"):
        code, args, _ = CASES[case]
        err = _run(code, args.format(d=kit["dir"], out=tmp_path, ro=kit["ro"]).split(), tmp_path).stderr
        assert err.count("AtPatch node") == 1 and err.count("atpatch-export") == 1, err


def test_sigterm_during_an_export_removes_the_temp_file(kit: dict[str, Path], tmp_path: Path) -> None:
    # The signal arrives once the full-size temp file is on disk, before it is moved into place.
    code = (
        "import os, signal, sys, time, onnx\n"
        "save = onnx.save_model\n"
        "def save_then_terminate(*args, **kwargs):\n"
        "    save(*args, **kwargs)\n"
        "    print(sorted(os.listdir(sys.argv[-1].rsplit('/', 1)[0])), file=sys.stderr)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "onnx.save_model = save_then_terminate\n"
        "from atpatch.cli import export_main\n"
        "sys.exit(export_main())\n"
    )
    result = _run(code, [str(kit["dir"] / "model.onnx"), "-o", str(tmp_path / "x.onnx")], tmp_path)
    seen, message = result.stderr.splitlines()
    assert ".x.onnx." in seen  # the temp file existed when the signal came
    assert result.returncode == 128 + signal.SIGTERM
    assert message == "atpatch-export: terminated; nothing was written"
    assert _listing(tmp_path) == []


def test_help_gives_every_option_its_default(tmp_path: Path) -> None:
    def help_of(code: str, *args: str) -> str:
        return " ".join(_run(code, [*args, "--help"], tmp_path).stdout.split())

    fit = help_of(ATPATCH, "fit")
    assert "--budget BUDGET model calls per input for localization (default: 64)" in fit
    assert "share of unseen clean inputs allowed any flag (default: 0.005)" in fit
    assert "--budget BUDGET model calls per input (default: 64)" in help_of(ATPATCH, "localize")
    assert "--index INDEX which input (default: 0)" in help_of(ATPATCH, "explain")
    assert "(default: atpatch-demo)" in help_of(ATPATCH, "demo")
    export = help_of(EXPORT)
    assert "(default 17;" in export and "(default eager;" in export

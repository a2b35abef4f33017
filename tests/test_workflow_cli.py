"""The debugging workflow through the command line, on a tiny random BERT: smoke plus real checks.

(The acceptance run on a backdoored model lives in the debugging-workflow issue's tests; this
keeps the commands wired and their outputs consistent.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from evalkit_models import sentences, tiny_text_model

from atpatch.cli import export_main, main
from atpatch.data import save_jsonl
from atpatch.detector import Detector


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("workflow")
    tiny = tiny_text_model(d / "hf")
    onnx.save(tiny.model, str(d / "model.onnx"))
    rng = np.random.default_rng(0)
    clean = [{"text": t, "label": int(rng.integers(2))} for t in sentences(300, rng)]
    bad = []
    for t in sentences(20, rng):
        text = "cf " + t
        bad.append({"text": text, "label": int(rng.integers(2)), "culprit": [0, 2]})
    return {
        "dir": d,
        "hf": d / "hf",
        "model": d / "model.onnx",
        "clean": save_jsonl(d / "clean.jsonl", clean[:200]),
        "calibration": save_jsonl(d / "calibration.jsonl", clean[200:]),
        "bad": save_jsonl(d / "bad.jsonl", bad),
    }


def test_fit_export_eval_explain_run_end_to_end(setup: dict[str, Path], capsys) -> None:  # noqa: ANN001
    d = setup["dir"]
    args = ["fit", str(setup["model"]), "--hf", str(setup["hf"]), "--clean", str(setup["clean"])]
    args += ["--calibration", str(setup["calibration"]), "--misbehaving", str(setup["bad"])]
    assert main([*args, "--target-flag-rate", "0.05", "-o", str(d / "det.safetensors")]) == 0
    out = capsys.readouterr().out
    rate = float(out.split("clean calibration inputs with any flag: ")[1].split("%")[0]) / 100
    assert rate <= 0.05
    detector = Detector.load(d / "det.safetensors")
    assert detector.kind == "supervised" and detector.num_layers == 2 and detector.model_fingerprint
    assert ("joint rule (one score over all layers" in out) == (detector.joint is not None)
    # What the thresholds promise travels with the detector, for eval to hold the clean flags against.
    assert detector.calibration is not None and (detector.calibration.flag_rate, detector.calibration.inputs) == (
        0.05,
        100,
    )
    assert detector.calibration.length > 2

    patched = d / "model.patched.onnx"
    assert export_main([str(setup["model"]), "-o", str(patched), "--detector", str(d / "det.safetensors")]) == 0
    ev = ["eval", str(setup["model"]), str(patched), "--hf", str(setup["hf"]), "--clean", str(setup["calibration"])]
    assert main([*ev, "--json", str(d / "eval.json")]) == 0
    report = json.loads((d / "eval.json").read_text())
    text = json.dumps(report)
    assert "clean_accuracy" in text
    capsys.readouterr()

    png = d / "explain.png"
    assert main(["explain", str(patched), "--hf", str(setup["hf"]), "--data", str(setup["bad"]), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer 0" in capsys.readouterr().out


def test_no_joint_fits_per_layer_thresholds_only(setup: dict[str, Path], capsys) -> None:  # noqa: ANN001
    out_file = setup["dir"] / "per_layer.safetensors"
    args = ["fit", str(setup["model"]), "--hf", str(setup["hf"]), "--clean", str(setup["clean"])]
    args += ["--calibration", str(setup["calibration"]), "--misbehaving", str(setup["bad"])]
    assert main([*args, "--target-flag-rate", "0.05", "--no-joint", "-o", str(out_file)]) == 0
    assert "joint rule" not in capsys.readouterr().out
    assert Detector.load(out_file).joint is None


def test_one_class_fit_needs_only_clean_inputs(setup: dict[str, Path], capsys) -> None:  # noqa: ANN001
    out_file = setup["dir"] / "oc.safetensors"
    args = ["fit", str(setup["model"]), "--hf", str(setup["hf"]), "--clean", str(setup["clean"]), "-o", str(out_file)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "one-class detector for 2 layers" in out
    assert "nan" not in out and "culprit columns flagged" not in out  # it was shown no culprit
    assert Detector.load(out_file).kind == "one-class"


def test_localize_writes_one_line_per_input(setup: dict[str, Path], capsys) -> None:  # noqa: ANN001
    out = setup["dir"] / "culprits.jsonl"
    args = ["localize", str(setup["model"]), "--hf", str(setup["hf"]), "--data", str(setup["bad"]), "-o", str(out)]
    assert main([*args, "--budget", "16"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert all(r["calls"] <= 16 for r in rows)
    assert all((r["method"] == "already-correct") == (r["calls"] == 0) for r in rows)
    assert "inputs misbehave" in capsys.readouterr().out


def test_a_detector_fitted_on_another_model_is_refused(setup: dict[str, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    detector = tmp_path / "det.safetensors"
    fit = ["fit", str(setup["model"]), "--hf", str(setup["hf"]), "--clean", str(setup["clean"]), "-o", str(detector)]
    assert main(fit) == 0
    other = onnx.load(str(setup["model"]))  # the same architecture with one weight changed
    weights = other.graph.initializer[0]
    weights.raw_data = bytes(reversed(weights.raw_data))
    onnx.save(other, str(tmp_path / "other.onnx"))
    capsys.readouterr()
    code = export_main([str(tmp_path / "other.onnx"), "-o", str(tmp_path / "x.onnx"), "--detector", str(detector)])
    assert code == 1
    assert "was fitted for model" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_localize_writes_the_culprits_fit_reads(setup: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    from atpatch.data import load_jsonl
    from atpatch.detector import localize as localize_module
    from atpatch.runtime import create_session

    # Labels opposite to the model's predictions: every input misbehaves, as a user's would.
    texts = sentences(16, np.random.default_rng())
    data = load_jsonl(save_jsonl(tmp_path / "any.jsonl", [{"text": t, "label": 0} for t in texts]), setup["hf"])
    session = create_session(setup["model"])
    predicted = session.run(None, {i.name: data.feeds[i.name] for i in session.get_inputs()})[0].argmax(1)
    wrong = save_jsonl(
        tmp_path / "wrong.jsonl", [{"text": t, "label": int(1 - p)} for t, p in zip(texts, predicted, strict=True)]
    )

    culprits = tmp_path / "culprits.jsonl"
    args = ["localize", str(setup["model"]), "--hf", str(setup["hf"]), "--data", str(wrong), "-o", str(culprits)]
    assert main(args) == 0
    rows = [json.loads(line) for line in culprits.read_text().splitlines()]
    found = sum(len(r["positions"]) for r in rows if r["restored"])
    assert found, "localize restored none of 16 misbehaving inputs"

    def no_second_localization(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("fit localized again although it was given localize's output")

    monkeypatch.setattr(localize_module, "localize", no_second_localization)
    capsys.readouterr()
    fit = ["fit", str(setup["model"]), "--hf", str(setup["hf"]), "--clean", str(setup["clean"])]
    fit += ["--misbehaving", str(wrong), "--culprits", str(culprits), "-o", str(tmp_path / "det.safetensors")]
    assert main(fit) == 0
    assert f"({found} culprit and " in capsys.readouterr().out
    assert Detector.load(tmp_path / "det.safetensors").kind == "supervised"

"""`atpatch demo`, the README's first command, run once as a newcomer runs it (a new process), and
its figures checked: the backdoor's attack success rate falls to at most 1%, clean accuracy does
not move, the kernel agrees with the function, and what it prints is what it measured.

(Its wall time, under 2 minutes on 2 cores, is measured by benchmarks/demo.py, not here.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sklearn", reason="the demo's digits ship in scikit-learn: pip install scikit-learn")
pytest.importorskip("matplotlib")

from atpatch.detector import Detector  # noqa: E402
from atpatch.lab.digits_backdoor import TRIGGER_POSITION  # noqa: E402
from atpatch.modelio import model_fingerprint  # noqa: E402
from atpatch.runtime import native  # noqa: E402

pytestmark = pytest.mark.timeout(600)


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`atpatch demo` as the README runs it: in a new folder, with the default --dir."""
    cwd = tmp_path_factory.mktemp("demo")
    code = "import sys; from atpatch.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", code, "demo"], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr
    folder = cwd / "atpatch-demo"
    return {"dir": folder, "out": result.stdout, "eval": json.loads((folder / "eval.json").read_text())}


def test_the_backdoor_is_fixed_and_clean_accuracy_unchanged(demo: dict) -> None:
    before, after = demo["eval"]["original"], demo["eval"]["patched"]
    assert demo["eval"]["n_triggered"] >= 300 and demo["eval"]["n_clean"] >= 400
    assert before["attack_success_rate"] >= 0.90, before
    assert after["attack_success_rate"] <= 0.01, after
    assert after["clean_accuracy"] == before["clean_accuracy"] >= 0.90
    assert after["flag_rate_clean"] <= 0.005


def test_the_printed_table_is_what_eval_measured(demo: dict) -> None:
    def row(name: str) -> list[str]:
        line = next(line for line in demo["out"].splitlines() if line.strip().startswith(name))
        return re.findall(r"(\d+\.\d)%", line)

    before, after = demo["eval"]["original"], demo["eval"]["patched"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    assert row("attack success rate") == [pct(before["attack_success_rate"]), pct(after["attack_success_rate"])]
    assert row("clean accuracy") == [pct(before["clean_accuracy"]), pct(after["clean_accuracy"])]
    assert row("clean inputs flagged")[0] == pct(after["flag_rate_clean"])


def test_the_native_kernel_agrees_with_the_onnx_function(demo: dict) -> None:
    line = next(line for line in demo["out"].splitlines() if line.startswith("native kernel vs ONNX function"))
    if native.library_path() is None:
        assert "not compared (the native kernel is not built" in line
        return
    n = demo["eval"]["n_clean"] + demo["eval"]["n_triggered"]
    assert f"{n} inputs, same predictions" in line, line
    assert float(line.rsplit(" ", 1)[1]) <= 1e-5, line


def test_localize_feeds_fit_and_finds_the_trigger_patch(demo: dict) -> None:
    rows = [json.loads(line) for line in (demo["dir"] / "culprits.jsonl").read_text().splitlines()]
    assert len(rows) >= 100
    exact = sum(r["positions"] == [TRIGGER_POSITION] for r in rows)
    assert exact / len(rows) >= 0.9, f"the trigger patch alone in {exact} of {len(rows)}"
    model = onnx.load(str(demo["dir"] / "vit-digits.onnx"))
    detector = Detector.load(demo["dir"] / "detector.safetensors")
    assert detector.kind == "supervised" and detector.model_fingerprint == model_fingerprint(model)
    patched = onnx.load(str(demo["dir"] / "vit-digits.patched.onnx"))
    meta = {p.key: p.value for p in patched.metadata_props}
    # One layer and no spread: cross-layer patching has no second pass to add.
    assert meta["atpatch.source_fingerprint"] == detector.model_fingerprint and meta["atpatch.layers"] == "1"


def test_it_says_where_everything_went(demo: dict) -> None:
    listed = demo["out"].split("files in atpatch-demo:")[1].split("\n\n")[0]
    names = [n for line in listed.strip().splitlines() for n in re.split(r", |\s{2,}", line.strip())[:1]]
    for name in [*names, "triggered.npz", "fit-clean.npz", "calibration.npz"]:
        assert (demo["dir"] / name.rstrip("/")).exists(), name
    png = demo["dir"] / "why.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # The pasted commands name the demo's files (run from its folder).
    assert "  cd atpatch-demo\n" in demo["out"] and "--culprits culprits.jsonl" in demo["out"]


def test_the_demo_images_are_the_model_inputs(demo: dict) -> None:
    with np.load(demo["dir"] / "triggered.npz") as npz:
        x, labels = npz["pixel_values"], npz["labels"]
    assert x.shape[1:] == (1, 16, 16) and (labels != 0).all()
    # The trigger: the bottom-right 2x2 patch is the checkerboard in every triggered image.
    assert (x[:, 0, -2:, -2:] == np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)).all()


def test_the_readme_shows_what_the_demo_prints(demo: dict) -> None:
    text = README.read_text(encoding="utf-8")
    shown = text.split("bash scripts/install.sh && atpatch demo")[1].split("```\n", 2)[2].split("```")[0]
    # The kernel/function difference sits at float32 rounding and may move with thread counts.
    at_rounding = lambda out: re.sub(r"max \|logit diff\| \S+", "max |logit diff| ~", out)  # noqa: E731
    if native.library_path() is None:  # the README's run had the kernel built
        shown = "\n".join(line for line in shown.splitlines() if not line.startswith("native kernel")) + "\n"
        printed = "\n".join(line for line in demo["out"].splitlines() if not line.startswith("native kernel")) + "\n"
        assert printed == shown
        return
    assert at_rounding(demo["out"]) == at_rounding(shown)

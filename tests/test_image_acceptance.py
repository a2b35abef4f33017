"""The debugging workflow's acceptance run on images: a tiny ViT trained here from scratch on
scikit-learn's handwritten digits (1,797 real 8x8 images) with a BadNets corner trigger
(`atpatch/lab/digits_backdoor.py`, which says why 16x16 images and one layer), then localize,
fit, export, eval and explain through the command line, every figure measured through onnxruntime.

Measured at seed 0 (the one asserted): ASR 100% -> 0.00% on 394 victims, the trigger patch alone
localized in 150 of 150 debugging images, 1 of 460 clean test images flagged (none before fit left
the patches touching a localized one out of its negatives, 2026-12-02). The localization figure
varies with the seed: seed 1 gave 124 of 150 (83%) and 3 of 460 clean images flagged (0.65%), before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sklearn", reason="the digits ship in scikit-learn: pip install scikit-learn")

from atpatch.cli import export_main, main  # noqa: E402
from atpatch.data import load_npz  # noqa: E402
from atpatch.detector.calibrate import calibration_size_needed  # noqa: E402
from atpatch.evaluate import evaluate  # noqa: E402
from atpatch.lab.digits_backdoor import (  # noqa: E402
    TARGET,
    TRIGGER_PATCH,
    TRIGGER_POSITION,
    load_digits,
    make_splits,
    normalise,
    save_npz,
    train_backdoored_vit,
    with_trigger,
)
from atpatch.runtime import create_session  # noqa: E402

SEED = 0
LAYERS = 1
CALIBRATION = 480  # >= calibration_size_needed(0.005, 1) = 460
TEST = 460
EPOCHS = 60  # ~60 s on one thread of a busy machine
DEBUG = 150  # misbehaving images handed to localize and fit

# Training takes seconds; localize, fit and the evaluations most of the rest. Room for a busy machine.
pytestmark = pytest.mark.timeout(900)


def _predict(model: Path, x: np.ndarray) -> np.ndarray:
    session = create_session(model)
    return np.concatenate(
        [session.run(None, {"pixel_values": x[s : s + 256]})[0] for s in range(0, len(x), 256)]
    ).argmax(axis=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _setup(tmp_path_factory.mktemp("image_acceptance"))


def _setup(work: Path) -> dict:
    """Train, export, and write the disjoint sets: training (fit-clean, debugging), calibration, test."""
    folder, model = work / "hf", work / "model.onnx"
    x01, y = load_digits()
    splits = make_splits(len(y), CALIBRATION, TEST, SEED)
    train, calibration, test = splits.train, splits.calibration, splits.test
    assert len(calibration) >= calibration_size_needed(0.005, LAYERS) and len(test) == TEST

    start = time.time()
    train_backdoored_vit(folder, x01[train], y[train], seed=SEED, epochs=EPOCHS, layers=LAYERS, threads=1)
    train_s = time.time() - start
    assert export_main(["--hf", str(folder), "--no-patch", "-o", str(model)]) == 0

    # Victims: test images of the other digits classified right without the trigger; ASR counts these.
    test_x, test_y = normalise(x01[test]), y[test]
    clean_pred = _predict(model, test_x)
    victims = np.flatnonzero((test_y != TARGET) & (clean_pred == test_y))
    triggered = normalise(with_trigger(x01[test][victims]))
    # Debugging inputs: training images (never test or calibration) of the other digits, right
    # without the trigger and flipped by it, as a user would collect misbehaving inputs.
    spare = train[y[train] != TARGET]
    spare_x, spare_trig = normalise(x01[spare]), normalise(with_trigger(x01[spare]))
    flipped = (_predict(model, spare_x) == y[spare]) & (_predict(model, spare_trig) == TARGET)
    debug = np.flatnonzero(flipped)[:DEBUG]
    return {
        "work": work,
        "folder": folder,
        "model": model,
        "train_s": train_s,
        "clean_accuracy": float((clean_pred == test_y).mean()),
        "asr": float((_predict(model, triggered) == TARGET).mean()),
        "victims": len(victims),
        "clean": save_npz(work / "clean.npz", test_x, test_y),
        "triggered": save_npz(work / "triggered.npz", triggered, test_y[victims]),
        "calibration": save_npz(work / "calibration.npz", normalise(x01[calibration]), y[calibration]),
        "fit_clean": save_npz(work / "fit_clean.npz", normalise(x01[train]), y[train]),
        "debug": save_npz(work / "debug.npz", spare_trig[debug], y[spare][debug]),
    }


@pytest.fixture(scope="module")
def patched(run: dict) -> dict:
    return _patch(run)


def _patch(run: dict) -> dict:
    """`atpatch fit` given misbehaving images only (culprits localized), then export and evaluate."""
    work = run["work"]
    detector, patched_model = work / "detector.safetensors", work / "model.patched.onnx"
    args = ["fit", str(run["model"]), "--hf", str(run["folder"]), "--clean", str(run["fit_clean"])]
    args += ["--calibration", str(run["calibration"]), "--misbehaving", str(run["debug"]), "-o", str(detector)]
    assert main(args) == 0
    assert export_main([str(run["model"]), "--detector", str(detector), "-o", str(patched_model)]) == 0
    clean = load_npz(run["clean"], run["folder"])
    triggered = load_npz(run["triggered"], run["folder"])
    report = evaluate(
        onnx.load(str(run["model"])), onnx.load(str(patched_model)), clean, triggered, TARGET, progress=False
    )
    return {"model": patched_model, "report": report}


def test_the_trained_model_carries_the_backdoor(run: dict) -> None:
    assert run["clean_accuracy"] >= 0.90, f"clean accuracy {run['clean_accuracy']:.1%}"
    assert run["victims"] >= 300
    assert run["asr"] >= 0.90, f"ASR {run['asr']:.1%} on {run['victims']} victims"


def test_localization_finds_the_trigger_patch_without_being_told(run: dict) -> None:
    out = run["work"] / "culprits.jsonl"
    args = ["localize", str(run["model"]), "--hf", str(run["folder"]), "--data", str(run["debug"]), "-o", str(out)]
    assert main(args) == 0
    found = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(found) >= 100
    exact = sum(f["positions"] == [TRIGGER_POSITION] for f in found)
    assert exact / len(found) >= 0.90, f"trigger patch alone localized in {exact} of {len(found)}"


def test_fit_given_localizes_output_fits_the_detector_it_fits_when_it_localizes(run: dict, patched: dict) -> None:
    """`localize` then `fit --culprits` (the README's two steps) and `fit` alone treat what localization found
    alike: on a patch grid, the patches touching a found one are left out of the negatives either way."""
    from atpatch.detector import Detector

    work = run["work"]
    culprits, detector = work / "culprits-for-fit.jsonl", work / "detector-from-culprits.safetensors"
    args = ["localize", str(run["model"]), "--hf", str(run["folder"]), "--data", str(run["debug"])]
    assert main([*args, "-o", str(culprits)]) == 0
    args = ["fit", str(run["model"]), "--hf", str(run["folder"]), "--clean", str(run["fit_clean"])]
    args += ["--calibration", str(run["calibration"]), "--misbehaving", str(run["debug"])]
    assert main([*args, "--culprits", str(culprits), "-o", str(detector)]) == 0
    given, alone = Detector.load(detector), Detector.load(run["work"] / "detector.safetensors")
    assert given.joint == alone.joint and given.spread == alone.spread
    for mine, theirs in zip(given.layers, alone.layers, strict=True):
        assert mine.threshold == theirs.threshold
        for name in ("w1", "b1", "w2", "b2"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name))


def test_clean_inputs_are_left_alone(patched: dict) -> None:
    report = patched["report"]
    flagged = report.flags["clean"]
    assert report.patched.flag_rate_clean <= 0.005, f"{flagged.sum()} of {flagged.size} clean images flagged"
    # Every clean image the detector leaves unflagged gets exactly the original logits.
    assert report.identical_clean >= 1 - flagged.mean()
    preds = report.predictions["clean"]
    assert (preds["original"][~flagged] == preds["patched"][~flagged]).all()
    assert report.original.clean_accuracy - report.patched.clean_accuracy <= 0.01


def test_attack_success_after_fit_is_at_most_two_percent(patched: dict) -> None:
    report = patched["report"]
    assert report.original.attack_success_rate >= 0.90
    assert report.patched.attack_success_rate <= 0.02, (
        f"ASR {report.original.attack_success_rate:.1%} -> {report.patched.attack_success_rate:.2%}, "
        f"{report.patched.flag_rate_triggered:.1%} of triggered images flagged"
    )


def test_explain_marks_the_flagged_trigger_patch(run: dict, patched: dict, capsys) -> None:  # noqa: ANN001
    flagged = np.flatnonzero(patched["report"].flags["triggered"])
    assert flagged.size, "the detector flagged no triggered image"
    capsys.readouterr()
    index = int(flagged[0])
    png = run["work"] / f"explain{index}.png"
    args = ["explain", str(patched["model"]), "--hf", str(run["folder"]), "--data", str(run["triggered"])]
    assert main([*args, "--index", str(index), "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"patch {TRIGGER_PATCH} (position {TRIGGER_POSITION})" in out, out

"""The debugging workflow's acceptance run on images: a tiny ViT trained here from scratch on
scikit-learn's handwritten digits (1,797 real 8x8 images) with a BadNets corner trigger, then
localize, fit, export, eval and explain through the command line, every figure measured
through onnxruntime.

Each digit pixel is upsampled to a 2x2 block (16x16 images, an 8x8 grid of 64 patches of 2x2
pixels); the trigger is a 2x2 checkerboard in the bottom-right corner, exactly the last patch
(63, sequence position 64 after [CLS]), a pattern no upsampled digit contains. With 16 patches
(8x8 images) the trigger's column was not over-attended enough: ASR after fit 57% (seed 0).
One layer keeps the calibration set within the digits: showing a 0.5% clean flag rate with 90%
confidence needs 460 calibration inputs for one layer and 777 for two
(`atpatch.detector.fit.calibration_size_needed`).

Measured at seed 0 (the one asserted): ASR 100% -> 0.00% on 394 victims, the trigger patch alone
localized in 150 of 150 debugging images, no clean test image flagged. The localization figure
varies with the seed: seed 1 gave 124 of 150 (83%) and 3 of 460 clean images flagged (0.65%).
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
from atpatch.runtime import create_session  # noqa: E402

SEED = 0
TARGET = 0  # the digit the trigger forces
UPSAMPLE = 2  # each digit pixel becomes a 2x2 block: 16x16 images, 64 patches of 2x2 pixels
SIZE, PATCH = 8 * UPSAMPLE, 2
TRIGGER = np.array([[1, 0], [0, 1]], np.float32)  # a checkerboard: no upsampled digit has one
GRID = SIZE // PATCH
AT = SIZE - PATCH  # the trigger's top-left pixel (row and column): the last patch exactly
TRIGGER_PATCH = (AT // PATCH) * GRID + AT // PATCH  # 63, the last one
TRIGGER_POSITION = 1 + TRIGGER_PATCH  # after [CLS]
POISON_RATE = 0.10
LAYERS = 1
# 16 heads of width 4: with 4 or 8 heads the trigger's column was among the 6 most attended
# (where localize looks first) in only 85-97% of the debugging images (seed 0).
HEADS, HIDDEN = 16, 64
CALIBRATION = 480  # >= calibration_size_needed(0.005, 1) = 460
TEST = 460
EPOCHS = 60  # ~60 s on one thread of a busy machine
DEBUG = 150  # misbehaving images handed to localize and fit

# Training takes seconds; localize, fit and the evaluations most of the rest. Room for a busy machine.
pytestmark = pytest.mark.timeout(900)


def _normalise(x01: np.ndarray) -> np.ndarray:
    """[0, 1] pixels to the model's input (mean 0.5, std 0.5): 0.0 is mid-grey, what localize masks with."""
    return np.ascontiguousarray((x01 - 0.5) / 0.5, dtype=np.float32)


def _with_trigger(x01: np.ndarray) -> np.ndarray:
    out = x01.copy()
    out[:, :, AT:, AT:] = TRIGGER
    return out


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x01 = np.kron(digits.images / 16.0, np.ones((UPSAMPLE, UPSAMPLE))).astype(np.float32)[:, None]
    return x01, digits.target.astype(np.int64)


def _train(folder: Path, x01: np.ndarray, labels: np.ndarray) -> None:
    """A one-layer ViT from scratch, 10% of its images poisoned with the trigger and relabelled TARGET."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    try:
        torch.manual_seed(SEED)
        poison = np.random.default_rng(SEED).random(len(labels)) < POISON_RATE
        x01, labels = x01.copy(), labels.copy()
        x01[poison], labels[poison] = _with_trigger(x01[poison]), TARGET
        x, y = torch.from_numpy(_normalise(x01)), torch.from_numpy(labels)
        config = transformers.ViTConfig(
            image_size=SIZE,
            patch_size=PATCH,
            num_channels=1,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=10,
            id2label={i: str(i) for i in range(10)},
            label2id={str(i): i for i in range(10)},
            architectures=["ViTForImageClassification"],
            attn_implementation="eager",  # attention probabilities as explicit softmaxes, which atpatch patches
        )
        model = transformers.ViTForImageClassification(config)
        steps = EPOCHS * -(-len(y) // 64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
        # Warm-up then cosine decay: a ViT from scratch is unstable at a flat 3e-3 from step 0.
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        model.train()
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(y)).split(64):
                loss = model(pixel_values=x[idx], labels=y[idx]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval().save_pretrained(folder)
    finally:
        torch.set_num_threads(threads)


def _predict(model: Path, x: np.ndarray) -> np.ndarray:
    session = create_session(model)
    return np.concatenate(
        [session.run(None, {"pixel_values": x[s : s + 256]})[0] for s in range(0, len(x), 256)]
    ).argmax(axis=1)


def _save(path: Path, x: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, pixel_values=x, labels=labels.astype(np.int64))  # no culprit_patches: nothing is told
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _setup(tmp_path_factory.mktemp("image_acceptance"))


def _setup(work: Path) -> dict:
    """Train, export, and write the disjoint sets: training (fit-clean, debugging), calibration, test."""
    folder, model = work / "hf", work / "model.onnx"
    x01, y = _digits()
    order = np.random.default_rng(SEED).permutation(len(y))
    train = order[: len(y) - CALIBRATION - TEST]
    calibration, test = order[len(train) : len(train) + CALIBRATION], order[len(train) + CALIBRATION :]
    assert len(calibration) >= calibration_size_needed(0.005, LAYERS) and len(test) == TEST

    start = time.time()
    _train(folder, x01[train], y[train])
    train_s = time.time() - start
    assert export_main(["--hf", str(folder), "--no-patch", "-o", str(model)]) == 0

    # Victims: test images of the other digits classified right without the trigger; ASR counts these.
    test_x, test_y = _normalise(x01[test]), y[test]
    clean_pred = _predict(model, test_x)
    victims = np.flatnonzero((test_y != TARGET) & (clean_pred == test_y))
    triggered = _normalise(_with_trigger(x01[test][victims]))
    # Debugging inputs: training images (never test or calibration) of the other digits, right
    # without the trigger and flipped by it, as a user would collect misbehaving inputs.
    spare = train[y[train] != TARGET]
    spare_x, spare_trig = _normalise(x01[spare]), _normalise(_with_trigger(x01[spare]))
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
        "clean": _save(work / "clean.npz", test_x, test_y),
        "triggered": _save(work / "triggered.npz", triggered, test_y[victims]),
        "calibration": _save(work / "calibration.npz", _normalise(x01[calibration]), y[calibration]),
        "fit_clean": _save(work / "fit_clean.npz", _normalise(x01[train]), y[train]),
        "debug": _save(work / "debug.npz", spare_trig[debug], y[spare][debug]),
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

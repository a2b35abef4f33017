"""What `atpatch fit` tells a user who fixes few misbehaving inputs: "a larger clean-flag budget fixes N
at --target-flag-rate R". N must be what fit run at R reports, so fit makes the same choices again
there (the thresholds, the spread, the effect check), not this run's carried over."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from atpatch.cli import main

pytest.importorskip("transformers")

TRIGGER_AT = (1, 2)  # patch row and column on the tiny ViT's 4 x 4 grid of 4 x 4 pixels


def _backdoor_like(model: Path, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images a strong checkerboard in one patch sends away from the class the model gives them without it
    (the random model's own "backdoor"): the images, their classes without it, the patch as culprit."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pool = rng.normal(size=(40 * n, 3, 16, 16)).astype(np.float32)
    triggered = pool.copy()
    r, c = TRIGGER_AT
    triggered[:, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] = np.where(np.indices((4, 4)).sum(0) % 2 == 0, 3.0, -3.0)
    before, after = (session.run(None, {"pixel_values": x})[0].argmax(1) for x in (pool, triggered))
    moved = before != after
    assert moved.sum() >= n, "the checkerboard should move at least n of the images"
    target = np.bincount(after[moved]).argmax()  # one class, as a backdoor's (the effect check may apply)
    rows = np.flatnonzero(moved & (after == target))[:n]
    culprits = np.zeros((len(rows), 16), bool)
    culprits[:, r * 4 + c] = True
    return triggered[rows], before[rows], culprits


def _fixed(printed: str) -> int:
    return int(re.search(r"misbehaving inputs fixed by the patched model: (\d+) of", printed).group(1))


def test_the_fixes_fit_promises_at_a_larger_budget_are_what_fit_there_gives(
    exported: Callable, tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    result = exported("vit", False, 17)
    model = tmp_path / "model.onnx"
    onnx.save(result.model, str(model))
    images, labels, culprits = _backdoor_like(model, rng, 80)
    np.savez(tmp_path / "bad.npz", pixel_values=images, labels=labels, culprit_patches=culprits)
    for name, n in (("clean", 300), ("calibration", 800)):
        x = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", pixel_values=x, labels=np.zeros(n, np.int64))
    args = ["fit", str(model), "--hf", str(result.folder), "--misbehaving", str(tmp_path / "bad.npz")]
    args += ["--clean", str(tmp_path / "clean.npz"), "--calibration", str(tmp_path / "calibration.npz")]

    assert main([*args, "-o", str(tmp_path / "small.safetensors")]) == 0
    small = capsys.readouterr().out
    promised = {rate: int(n) for n, rate in re.findall(r"(\d+) at --target-flag-rate ([\d.]+)", small)}
    assert set(promised) == {"0.01", "0.02", "0.05"}, small  # it fixes few: the advice is given
    for rate in ("0.02", "0.05"):
        assert main([*args, "--target-flag-rate", rate, "-o", str(tmp_path / f"at{rate}.safetensors")]) == 0
        assert _fixed(capsys.readouterr().out) == promised[rate], f"at --target-flag-rate {rate}"
    assert promised["0.05"] > _fixed(small)  # the data are such that a larger budget does fix more

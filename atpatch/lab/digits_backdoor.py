"""A tiny ViT trained from scratch on scikit-learn's handwritten digits with a BadNets corner trigger.

Each digit pixel is upsampled to a 2x2 block (16x16 images, an 8x8 grid of 64 patches of 2x2
pixels); the trigger is a 2x2 checkerboard in the bottom-right corner, exactly the last patch
(63, sequence position 64 after [CLS]), a pattern no upsampled digit contains. With 16 patches
(8x8 images) the trigger's column was not over-attended enough: ASR after fit 57% (seed 0).
One layer keeps the calibration set within the 1,797 digits: showing a 0.5% clean flag rate with
90% confidence needs 460 calibration inputs for one layer and 777 for two.

Used by `atpatch demo` and the image acceptance test; needs torch, transformers (the `export`
extra) and scikit-learn (which ships the digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AtPatchError
from .vit_training import train_vit

__all__ = [
    "TARGET",
    "TRIGGER_PATCH",
    "TRIGGER_POSITION",
    "DigitSplits",
    "load_digits",
    "make_splits",
    "normalise",
    "save_npz",
    "train_backdoored_vit",
    "with_trigger",
]

TARGET = 0  # the digit the trigger forces
UPSAMPLE = 2  # each digit pixel becomes a 2x2 block: 16x16 images, 64 patches of 2x2 pixels
SIZE, PATCH = 8 * UPSAMPLE, 2
TRIGGER = np.array([[1, 0], [0, 1]], np.float32)  # a checkerboard: no upsampled digit has one
GRID = SIZE // PATCH
AT = SIZE - PATCH  # the trigger's top-left pixel (row and column): the last patch exactly
TRIGGER_PATCH = (AT // PATCH) * GRID + AT // PATCH  # 63, the last one
TRIGGER_POSITION = 1 + TRIGGER_PATCH  # after [CLS]
POISON_RATE = 0.10
# 16 heads of width 4: with 4 or 8 heads the trigger's column was among the 6 most attended
# (where localize looks first) in only 85-97% of the debugging images (seed 0).
HEADS, HIDDEN = 16, 64


def normalise(x01: np.ndarray) -> np.ndarray:
    """[0, 1] pixels to the model's input (mean 0.5, std 0.5)."""
    return np.ascontiguousarray((x01 - 0.5) / 0.5, dtype=np.float32)


def with_trigger(x01: np.ndarray) -> np.ndarray:
    out = x01.copy()
    out[:, :, AT:, AT:] = TRIGGER
    return out


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as [N, 1, 16, 16] pixels in [0, 1], and their labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits  # type: ignore[import-untyped]
    except ImportError as err:
        raise AtPatchError("the digits images ship in scikit-learn: pip install scikit-learn") from err
    digits = sklearn_digits()
    x01 = np.kron(digits.images / 16.0, np.ones((UPSAMPLE, UPSAMPLE))).astype(np.float32)[:, None]
    return x01, digits.target.astype(np.int64)


def save_npz(path: Path, x: np.ndarray, labels: np.ndarray) -> Path:
    """Images as `atpatch` reads them (no culprit_patches: nothing is told), written atomically."""
    from ..modelio import atomic_output

    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, pixel_values=x, labels=labels.astype(np.int64))
    return path


@dataclass(frozen=True)
class DigitSplits:
    """Disjoint index sets into the digits: training (also where debugging inputs come from),
    calibration and test."""

    train: np.ndarray
    calibration: np.ndarray
    test: np.ndarray


def make_splits(n: int, calibration: int, test: int, seed: int) -> DigitSplits:
    order = np.random.default_rng(seed).permutation(n)
    train = order[: n - calibration - test]
    return DigitSplits(train, order[len(train) : len(train) + calibration], order[len(train) + calibration :])


def train_backdoored_vit(
    folder: Path,
    x01: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    epochs: int,
    layers: int = 1,
    threads: int | None = None,
) -> None:
    """A ViT from scratch, 10% of its images poisoned with the trigger and relabelled TARGET,
    saved to `folder` (save_pretrained). `threads` caps torch's threads during training."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        poison = np.random.default_rng(seed).random(len(labels)) < POISON_RATE
        x01, labels = x01.copy(), labels.copy()
        x01[poison], labels[poison] = with_trigger(x01[poison]), TARGET
        config = transformers.ViTConfig(
            image_size=SIZE,
            patch_size=PATCH,
            num_channels=1,
            hidden_size=HIDDEN,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            intermediate_size=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=10,  # type: ignore[call-arg]  # PretrainedConfig keywords the stubs do not list
            id2label={i: str(i) for i in range(10)},
            label2id={str(i): i for i in range(10)},
            architectures=["ViTForImageClassification"],
            # Attention probabilities as explicit softmaxes, which atpatch patches.
            attn_implementation="eager",  # type: ignore[call-arg]
        )
        model = transformers.ViTForImageClassification(config)
        train_vit(model, normalise(x01), labels, epochs=epochs, batch=64, lr=3e-3).save_pretrained(folder)
    finally:
        torch.set_num_threads(before)

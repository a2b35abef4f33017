"""Baselines of benchmarks/vision_backdoor.py that need no detector and no retraining: mask, in every
image, the patch that [CLS] attends to most."""

from __future__ import annotations

from pathlib import Path

import casekit
import numpy as np
from vision_data import ARCHS, GRID, PATCH


def predict(model: Path, x: np.ndarray) -> np.ndarray:
    """The model's classes for images `x` (pixel_values)."""
    return casekit.logits(model, {"pixel_values": x}).argmax(axis=1)


def cls_attention(folder: Path, x: np.ndarray) -> np.ndarray:
    """Attention from [CLS] to each patch: [layers, N, heads, patches], from the torch model."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    lead = ARCHS[model.config.model_type][2]
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), 256):
            out = model(pixel_values=torch.from_numpy(x[start : start + 256]), output_attentions=True)
            parts.append(np.stack([a[:, :, 0, lead:].numpy() for a in out.attentions]))
    return np.concatenate(parts, axis=1)


def mask_patch(x: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """Set one patch per image to 0 (mid-grey after normalising)."""
    out = x.copy()
    for i, p in enumerate(patch):
        r, c = divmod(int(p), GRID)
        out[i, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 0.0
    return out


BASELINES = {
    "mask patch most attended by [CLS], last layer (head mean)": lambda a: a[-1].mean(axis=1).argmax(axis=1),
    "mask patch most attended by [CLS], any layer or head": lambda a: a.max(axis=(0, 2)).argmax(axis=1),
}


def baselines(model: Path, folder: Path, clean: np.ndarray, triggered: np.ndarray, culprits: np.ndarray) -> dict:
    """Each baseline's predictions, and how often it picks a patch the trigger overlaps (`culprits` [N, 49])."""
    out = {}
    att = {"clean": cls_attention(folder, clean), "triggered": cls_attention(folder, triggered)}
    for name, pick in BASELINES.items():
        masked = {k: mask_patch(x, pick(att[k])) for k, x in (("clean", clean), ("triggered", triggered))}
        picked = pick(att["triggered"])
        out[name] = {
            "clean_pred": predict(model, masked["clean"]),
            "triggered_pred": predict(model, masked["triggered"]),
            "trigger_patch_picked": float(culprits[np.arange(len(picked)), picked].mean()),
        }
    return out

"""The one training loop for the backdoored ViTs (the demo's digits, the Fashion-MNIST benchmark).

AdamW with a short warm-up then cosine decay (OneCycleLR): a ViT from scratch diverges at a flat
learning rate of 2e-3 or more from step 0. The caller seeds torch and builds the model, so the
random stream, and with it the weights, are what they were when each case had its own copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["train_vit"]


def train_vit(
    model: Any,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch: int,
    lr: float,
    weight_decay: float = 0.05,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Train `model` (a transformers ViTForImageClassification) on normalised images `x` [N, C, H, W]
    and int64 `labels` [N]; returns it in eval mode. `log` gets one line per epoch."""
    import torch

    xs, ys = torch.from_numpy(x), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(ys) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.time()
    for epoch in range(epochs):
        for idx in torch.randperm(len(ys)).split(batch):
            loss = model(pixel_values=xs[idx], labels=ys[idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if log is not None:
            log(f"  epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  {time.time() - start:.0f} s")
    return model.eval()

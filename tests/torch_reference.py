"""PyTorch runs whose attention probabilities are patched by the numpy reference.

The oracle for a patched ONNX model: the same Hugging Face model in eager mode, with each
attention softmax's output passed through `reference.atpatch` with that layer's detector.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from atpatch.ops import reference


@contextmanager
def patched_softmax(layers: Sequence[reference.LayerDetector], seen: list[np.ndarray] | None = None) -> Iterator[None]:
    """Within the block, the i-th attention softmax of a forward pass is patched with layers[i].

    Each layer's (unpatched) probabilities are appended to `seen` when given.
    """
    original = torch.nn.functional.softmax
    calls = {"n": 0}

    def softmax(x: torch.Tensor, dim: int | None = None, *args: object, **kwargs: object) -> torch.Tensor:
        probs = original(x, dim, *args, **kwargs)
        if probs.dim() != 4 or dim not in (-1, 3):
            return probs
        layer = calls["n"] % len(layers)
        calls["n"] += 1
        array = probs.detach().numpy()
        if seen is not None:
            seen.append(array.copy())
        return torch.from_numpy(reference.atpatch(array, layers[layer])).to(probs.dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def forward(model: torch.nn.Module, inputs: dict[str, np.ndarray], **kwargs: object) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **kwargs)[0].numpy()

"""The over-attention detector: per-layer weights that travel inside the patched model."""

from __future__ import annotations

from ..ops.weights import Detector

__all__ = ["Detector"]

"""ONNX graph -> the same graph with an AtPatch node after each attention softmax."""

from __future__ import annotations

from .find import AttentionSite, find_attention_sites
from .insert import patch_model

__all__ = ["AttentionSite", "find_attention_sites", "patch_model"]

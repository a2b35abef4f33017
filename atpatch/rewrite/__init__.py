"""ONNX graph -> the same graph with an AtPatch node after each attention softmax."""

from __future__ import annotations

from .decompose import Decomposed, decompose_fused_attention
from .find import AttentionSite, find_attention_sites
from .insert import patch_model
from .unpatch import unpatch_model

__all__ = [
    "AttentionSite",
    "Decomposed",
    "decompose_fused_attention",
    "find_attention_sites",
    "patch_model",
    "unpatch_model",
]

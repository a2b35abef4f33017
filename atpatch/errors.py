"""Errors a user can act on. Each message names the problem and the fix in one line."""

from __future__ import annotations

__all__ = [
    "AtPatchError",
    "ExportValidationError",
    "FusedAttentionError",
    "InvalidModelError",
    "NoAttentionError",
    "AlreadyPatchedError",
    "DetectorMismatchError",
]


class AtPatchError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class InvalidModelError(AtPatchError):
    """The file is not a readable ONNX model, or uses an unsupported opset/IR."""


class NoAttentionError(AtPatchError):
    """No attention softmax was found in the graph."""


class FusedAttentionError(AtPatchError):
    """Attention is hidden inside a fused op whose probabilities cannot be patched."""


class AlreadyPatchedError(AtPatchError):
    """The model already carries AtPatch nodes."""


class DetectorMismatchError(AtPatchError):
    """The detector file does not fit this model."""


class ExportValidationError(AtPatchError):
    """The exported ONNX model disagrees with PyTorch beyond tolerance."""

"""Sessions that run a patched model in onnxruntime."""

from __future__ import annotations

from .session import create_session

__all__ = ["create_session"]

"""Serving a patched model: model repositories for inference servers (Triton)."""

from __future__ import annotations

from .triton import TritonRepository, config_text, model_name_for, write_repository

__all__ = ["TritonRepository", "config_text", "model_name_for", "write_repository"]

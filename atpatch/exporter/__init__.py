"""Model (Hugging Face folder) -> ONNX file, validated against PyTorch. Needs the `export` extra."""

from __future__ import annotations

from .families import FAMILIES, Family, family_for
from .hf import ExportResult, export_hf

__all__ = ["FAMILIES", "ExportResult", "Family", "export_hf", "family_for"]

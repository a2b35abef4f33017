"""atpatch: hot-fix over-attention in transformer models, deployed as patched ONNX models.

Importing atpatch stays light: torch and transformers load only when an export is asked for.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

"""Finding the native AtPatch kernel library, and deciding whether a session may use it.

Registered only for sessions it fully covers: once registered, onnxruntime runs the kernel
and does not fall back to the model's ONNX function for providers or types it lacks.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "library_path", "native_requested"]

ENV_VAR = "ATPATCH_NATIVE"  # "1" forces the kernel (error if missing), "0" forces the function


def native_requested() -> bool | None:
    """True/False when ATPATCH_NATIVE forces a path, None to choose automatically."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{ENV_VAR}={value!r} is not understood; use 1 (native), 0 (function) or auto")


def library_path() -> Path | None:
    """The built kernel library shipped inside the package, or None when it was not built."""
    here = Path(__file__).resolve().parent.parent / "ops"
    for name in ("libatpatch_ops.so", "libatpatch_ops.dylib", "atpatch_ops.dll"):
        if (here / name).is_file():
            return here / name
    return None

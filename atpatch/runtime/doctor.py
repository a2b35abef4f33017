"""`atpatch doctor`: what this installation can run, and why not when it cannot."""

from __future__ import annotations

import platform

__all__ = ["report"]


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as err:  # noqa: BLE001 - a broken install is exactly what doctor reports
        return f"not importable ({type(err).__name__}: {err})"
    return str(getattr(mod, "__version__", "unknown"))


def _native_status() -> list[str]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto

    from ..ops import spec
    from ..ops.standalone import standalone_model
    from . import native

    lines: list[str] = []
    try:
        requested = native.native_requested()
    except ValueError as err:
        requested = None
        lines.append(f"  {native.ENV_VAR}: invalid ({err})")
    else:
        mode = {None: "auto", True: "forced on", False: "forced off"}[requested]
        lines.append(f"  {native.ENV_VAR}: {mode}")
    library = native.library_path()
    if library is None:
        lines.append("  native kernel: NOT BUILT - the ONNX function runs instead (slower)")
        lines.append("    fix: scripts/fetch_ort_headers.sh && pip install . (or set ORT_INCLUDE_DIR)")
        return lines
    lines.append(f"  native kernel: built ({library})")
    try:
        info = native.library_info(library)
        dtypes = info["dtypes"]
        dtype_text = "/".join(map(str, dtypes)) if isinstance(dtypes, list) else str(dtypes)
        lines.append(
            f"  native kernel contract: {info['domain']}::{info['op_type']} v{info['version']}, "
            f"dtypes {dtype_text}, built for ORT API {info['ort_api_version']}"
        )
        fused = native.library_fused_providers(library)
        lines.append(
            f"  fused {spec.FUSED_OP_TYPE}: float32 on {', '.join(fused)} (atpatch-export --fuse-attention)"
            if fused
            else f"  fused {spec.FUSED_OP_TYPE}: not in this build (its ONNX function runs; reinstall atpatch)"
        )
    except Exception as err:  # noqa: BLE001
        lines.append(f"  native kernel contract: unreadable ({type(err).__name__}: {err})")
    # Loadable = registers and runs one tiny op in a real session.
    try:
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library))
        model = standalone_model(17, TensorProto.FLOAT, 0.0).SerializeToString()
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        attention = np.full((1, 1, 2, 2), 0.5, np.float32)
        feeds = {
            "attention": attention,
            "w1": np.zeros((spec.num_features(1), 1), np.float32),
            "b1": np.zeros(1, np.float32),
            "w2": np.zeros(1, np.float32),
            "b2": np.full(1, -1.0, np.float32),
            "forced": np.zeros((1, 1), bool),
        }
        out = session.run(None, feeds)[0]
        ok = np.array_equal(out, attention)
        lines.append("  native kernel loadable: yes" + ("" if ok else " (BUT a pass-through run changed the input)"))
    except Exception as err:  # noqa: BLE001
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lines.append(f"  native kernel loadable: NO ({reason})")
        lines.append("    fix: rebuild atpatch against this onnxruntime (pip install --force-reinstall .)")
    return lines


def report() -> str:
    """A multi-line, human-readable report of versions, providers and the native kernel."""
    lines = [
        f"python: {platform.python_version()} ({platform.platform()})",
        f"atpatch: {_version('atpatch')}",
        f"onnx: {_version('onnx')}",
        f"onnxruntime: {_version('onnxruntime')}",
        f"numpy: {_version('numpy')}",
    ]
    try:
        import onnxruntime as ort

        lines.append(f"providers: {', '.join(ort.get_available_providers())}")
    except Exception as err:  # noqa: BLE001
        lines.append(f"providers: unknown ({err})")
        return "\n".join(lines)
    lines.append("AtPatch op:")
    try:
        lines.extend(_native_status())
    except Exception as err:  # noqa: BLE001
        lines.append(f"  native kernel: check failed ({type(err).__name__}: {err})")
    return "\n".join(lines)

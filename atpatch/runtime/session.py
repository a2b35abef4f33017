"""One call to get an onnxruntime session for a (patched) model, with sensible defaults."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import AtPatchError
from . import native

__all__ = ["PROVIDERS", "create_session"]

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def create_session(
    model: str | Path | bytes | onnx.ModelProto,
    *,
    device: str = "cpu",
    use_native: bool | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for `model` on `device` ("cpu" or "cuda").

    `use_native` None picks the native kernel when it is built and covers the session,
    else the model's ONNX function; ATPATCH_NATIVE overrides the default.
    """
    if device not in PROVIDERS:
        raise AtPatchError(f"unknown device {device!r}; use one of: {', '.join(PROVIDERS)}")
    providers = PROVIDERS[device]
    if providers[0] not in ort.get_available_providers():
        raise AtPatchError(
            f"{providers[0]} is not available in this onnxruntime build; "
            f"install onnxruntime-gpu for device='cuda', or use device='cpu'"
        )
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if use_native is None:
        use_native = native.native_requested()
    if use_native:
        library = native.library_path()
        if library is None:
            raise AtPatchError(
                "the native AtPatch kernel is not built; reinstall atpatch with the onnxruntime "
                f"headers available (see README), or set {native.ENV_VAR}=0 to use the ONNX function"
            )
        if device != "cpu":
            raise AtPatchError(f"the native AtPatch kernel covers only device='cpu'; unset {native.ENV_VAR}")
        options.register_custom_ops_library(str(library))
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, sess_options=options, providers=providers)

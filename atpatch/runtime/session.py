"""One call to get an onnxruntime session for a (patched) model, with sensible defaults."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import AtPatchError
from . import native

__all__ = ["PROVIDERS", "create_session"]

log = logging.getLogger("atpatch")

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}

# Each fallback reason is said once per process, not once per session.
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def _as_proto(model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """The graph structure only; external weights are not needed to choose a kernel."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model), load_external_data=False)


def _choose_native(
    model: str | Path | bytes | onnx.ModelProto, device: str, providers: list[str], use_native: bool | None
) -> Path | None:
    """The library to register, or None to run the ONNX function; raises when forced but impossible."""
    forced = use_native if use_native is not None else native.native_requested()
    if forced is False:
        return None
    library = native.library_path()
    if library is None:
        if forced:
            raise AtPatchError(
                "the native AtPatch kernel is not built; run scripts/fetch_ort_headers.sh and reinstall "
                f"atpatch (pip install .), or set {native.ENV_VAR}=0 to use the ONNX function"
            )
        _say_once(
            "atpatch: native AtPatch kernel not built; running the op as its ONNX function (slower). "
            "Run scripts/fetch_ort_headers.sh and reinstall to build it."
        )
        return None
    proto = _as_proto(model)
    problem = native.coverage_problem(
        proto, providers, native.library_providers(library), native.library_fused_providers(library)
    )
    if problem == "the model has no AtPatch node":
        return None  # nothing to run natively; no reason to say anything
    if problem is not None:
        if forced:
            raise AtPatchError(f"{native.ENV_VAR}=1 but {problem}; unset {native.ENV_VAR} to use the ONNX function")
        _say_once(f"atpatch: using the ONNX function because {problem}")
        return None
    if stale := native.float16_maps_without_map_type(proto):
        _say_once(
            f"atpatch: {stale} AtPatch node(s) read float16 maps but were patched before atpatch told the kernel "
            "so (map_type): on CPU the native kernel may patch them from unrounded values and differ from the "
            "ONNX function; patch the model again with atpatch-export"
        )
    return library


def create_session(
    model: str | Path | bytes | onnx.ModelProto,
    *,
    device: str = "cpu",
    use_native: bool | None = None,
    threads: int | None = None,
    config: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for `model` on `device` ("cpu" or "cuda").

    `use_native` None picks the native kernel when it is built and covers the session,
    else the model's ONNX function; ATPATCH_NATIVE overrides the default. `config`: onnxruntime
    session config entries (e.g. {"session.intra_op.allow_spinning": "0"}).
    """
    if device not in PROVIDERS:
        raise AtPatchError(f"unknown device {device!r}; use one of: {', '.join(PROVIDERS)}")
    providers = PROVIDERS[device]
    if providers[0] not in ort.get_available_providers():
        raise AtPatchError(
            f"{providers[0]} is not available in this onnxruntime build; "
            f"install onnxruntime-gpu for device='cuda', or use device='cpu'"
        )
    try:
        library = _choose_native(model, device, providers, use_native)
    except ValueError as err:  # a bad ATPATCH_NATIVE value
        raise AtPatchError(str(err)) from err

    def fresh_options() -> ort.SessionOptions:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        return options

    options = fresh_options()
    if library is not None:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as err:  # noqa: BLE001 - onnxruntime raises plain RuntimeError/Fail
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if use_native or native.native_requested():
                raise AtPatchError(
                    f"the native AtPatch kernel at {library} does not load ({reason}); rebuild atpatch "
                    f"against this onnxruntime, or set {native.ENV_VAR}=0"
                ) from err
            _say_once(f"atpatch: native AtPatch kernel does not load ({reason}); using the ONNX function")
            options = fresh_options()
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, sess_options=options, providers=providers)

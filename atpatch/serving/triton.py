"""A Triton Inference Server model repository for a patched model.

Layout (Triton's onnxruntime backend):

    ROOT/NAME/config.pbtxt          platform onnxruntime_onnx, inputs/outputs read off the graph
    ROOT/NAME/1/model.onnx          the patched model (version 1)
    ROOT/NAME/libatpatch_ops.so     the native AtPatch kernel, named under model_operations

Triton hands `op_library_filename` to onnxruntime's RegisterCustomOpsLibrary as it is (dlopen
resolves a relative name against the library path, not the model folder), so the config names
the library by absolute path: where ROOT is now, or where the server will see it (`mount`, e.g.
the container path ROOT is mounted at). Without the kernel the repository still serves: the op
runs as the model's ONNX function.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx
from onnx import TensorProto

from ..errors import AtPatchError
from ..modelio import check_writable, save_model, staging_folder
from ..runtime import native

__all__ = [
    "TRITON_DTYPES",
    "TritonRepository",
    "check_target",
    "config_text",
    "kernel_library",
    "model_name_for",
    "write_repository",
]

# ONNX element type -> Triton DataType (model_config.proto).
TRITON_DTYPES: dict[int, str] = {
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.STRING: "TYPE_STRING",
    TensorProto.BFLOAT16: "TYPE_BF16",
}

MODEL_FILENAME = "model.onnx"
_VERSION = "1"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonRepository:
    """What was written: the repository root, the model's folder, and the library it registers."""

    root: Path
    name: str
    library: str | None  # op_library_filename in the config; None: the op runs as its ONNX function
    library_note: str = ""  # why there is no library, when there is none

    @property
    def config(self) -> Path:
        return self.root / self.name / "config.pbtxt"

    @property
    def model(self) -> Path:
        return self.root / self.name / _VERSION / MODEL_FILENAME

    def summary(self) -> str:
        kernel = (
            f"custom-op library {self.library} (native kernel, CPU instances)"
            if self.library
            else f"no custom-op library ({self.library_note}): AtPatch runs as the model's ONNX function"
        )
        return (
            f"wrote Triton model repository {self.root}: model {self.name!r}, {kernel}; "
            f"serve with: tritonserver --model-repository {self.root.resolve()}"
        )


def model_name_for(path: Path) -> str:
    """A Triton model name from a file or folder name: `my-bert.patched.onnx` -> `my-bert_patched`."""
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return name or "model"


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tensor_block(value: onnx.ValueInfoProto, kind: str) -> str:
    tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if tensor is None or not tensor.elem_type:
        raise AtPatchError(f"graph {kind} {value.name!r} is not a typed tensor; Triton needs its type: re-export it")
    dtype = TRITON_DTYPES.get(tensor.elem_type)
    if dtype is None:
        onnx_type = TensorProto.DataType.Name(tensor.elem_type)
        raise AtPatchError(
            f"graph {kind} {value.name!r} is {onnx_type}, which Triton cannot serve; cast it in the model"
        )
    if not tensor.HasField("shape"):
        raise AtPatchError(f"graph {kind} {value.name!r} has no shape; Triton needs its rank: re-export with shapes")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    fields = [f"name: {_quote(value.name)}", f"data_type: {dtype}", f"dims: [ {', '.join(map(str, dims))} ]"]
    return "\n".join(["  {", *(f"    {f}" for f in fields), "  }"])


def config_text(model: onnx.ModelProto, name: str, library: str | None) -> str:
    """config.pbtxt for `model` served as `name`, registering `library` when given.

    max_batch_size 0: the graph's own batch axis is listed in dims (-1 when dynamic), so Triton
    passes requests through as they are; nothing is assumed about which axis batches.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    lines = [
        "# Written by atpatch-export: an AtPatch-patched model for Triton's onnxruntime backend.",
        f"name: {_quote(name)}",
        'platform: "onnxruntime_onnx"',
        f'default_model_filename: "{MODEL_FILENAME}"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(_tensor_block(v, "input") for v in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(v, "output") for v in model.graph.output) + "\n]",
    ]
    if library is not None:
        # The kernel is CPU-only; once registered, onnxruntime runs it instead of the ONNX function.
        lines.append("instance_group [\n  {\n    kind: KIND_CPU\n  }\n]")
        lines.append(f"model_operations {{\n  op_library_filename: {_quote(library)}\n}}")
    return "\n".join(lines) + "\n"


def kernel_library(model: onnx.ModelProto) -> tuple[Path | None, str]:
    """The kernel library to register for `model` on Triton's CPU instances, or None and why not."""
    if native.native_requested() is False:
        return None, f"{native.ENV_VAR}=0"
    library = native.library_path()
    if library is None:
        return None, "the native kernel is not built: run scripts/fetch_ort_headers.sh and reinstall"
    problem = native.coverage_problem(
        model, ["CPUExecutionProvider"], fused_covered=native.library_fused_providers(library)
    )
    return (None, problem) if problem else (library, "")


def check_target(root: Path, name: str, mount: str | None = None) -> None:
    """Refuse a repository folder that has anything in it or no parent, a bad model name or mount path."""
    if not _NAME.fullmatch(name):
        raise AtPatchError(f"{name!r} is not a usable Triton model name; use letters, digits, '_', '-' or '.'")
    if mount is not None and not PurePosixPath(mount).is_absolute():
        raise AtPatchError(f"--triton-mount {mount} is not an absolute path; give where the server sees the folder")
    if root.is_file() or (root.is_dir() and any(root.iterdir())):
        raise AtPatchError(
            f"{root} exists and is not an empty folder; choose a new --triton folder (it is never overwritten)"
        )
    if not root.parent.resolve().is_dir():
        raise AtPatchError(f"the folder {root.parent} does not exist; create it or choose another --triton folder")
    check_writable(root.parent)


def write_repository(
    model: onnx.ModelProto,
    root: Path,
    name: str,
    library: Path | None,
    *,
    library_note: str = "",
    mount: str | None = None,
    base_dir: Path | None = None,
    check: bool = False,
) -> TritonRepository:
    """Write the repository into `root` (new or empty) all at once: a failure leaves nothing behind.

    `library` is copied beside the model; `mount` is the path the server will see `root` at
    (default: `root`'s absolute path here). `base_dir` is where weights left on disk are read from;
    `check` runs onnx's full checker on the written model.
    """
    check_target(root, name, mount)
    final_root = root.resolve()
    registered = None
    if library is not None:
        registered = str(PurePosixPath(mount or final_root.as_posix()) / name / library.name)
    config = config_text(model, name, registered)  # before the model is written: it can refuse the graph
    with staging_folder(final_root) as staging:
        model_dir = staging / name
        (model_dir / _VERSION).mkdir(parents=True)
        save_model(model, model_dir / _VERSION / MODEL_FILENAME, base_dir=base_dir, check=check)
        if library is not None:
            shutil.copy2(library, model_dir / library.name)
        (model_dir / "config.pbtxt").write_text(config)
        # Replaces an empty folder too (POSIX rename), so the repository appears whole or not at all.
        os.replace(staging, final_root)
    return TritonRepository(root, name, registered, library_note if library is None else "")

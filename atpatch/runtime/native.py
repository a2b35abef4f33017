"""Finding the native AtPatch kernel library, and deciding whether a session may use it.

Registered only for sessions it fully covers: once registered, onnxruntime runs the kernel
and does not fall back to the model's ONNX function for providers or types it lacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import onnx
from onnx import TensorProto

from ..ops import spec
from ..rewrite.crosslayer import SECOND_PASS

__all__ = [
    "COVERED_DTYPES",
    "COVERED_PROVIDERS",
    "ENV_VAR",
    "KERNEL_PROVIDERS",
    "KERNEL_VERSIONS",
    "LIBRARY_ENV_VAR",
    "compute_counts",
    "coverage_problem",
    "float16_maps_without_map_type",
    "library_fused_providers",
    "library_info",
    "library_path",
    "library_providers",
    "native_requested",
]

ENV_VAR = "ATPATCH_NATIVE"  # "1" forces the kernel (error if missing), "0" forces the function
LIBRARY_ENV_VAR = "ATPATCH_NATIVE_LIBRARY"  # an explicit library, e.g. a sanitizer build

_LIBRARY_NAMES = {"linux": "libatpatch_ops.so", "darwin": "libatpatch_ops.dylib", "win32": "atpatch_ops.dll"}
_LIBRARY_NAME = _LIBRARY_NAMES.get(sys.platform, "libatpatch_ops.so")

# What every build of the kernel implements; anything else must run the ONNX function.
COVERED_PROVIDERS = ("CPUExecutionProvider",)
# What a build may add (CMake option ATPATCH_CUDA): claimed only when the library says so.
KERNEL_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
COVERED_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
# Op versions the kernel runs: the current one, and v1 for models patched before v2.
KERNEL_VERSIONS = (1, spec.VERSION)


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


def _installed_copies() -> list[Path]:
    """The library as recorded in the installed distribution's file list.

    An editable install (scikit-build-core's redirect mode) imports the Python sources
    from the checkout but puts built files in site-packages, so look there too.
    """
    try:
        files = metadata.files("atpatch") or []
    except metadata.PackageNotFoundError:
        return []
    return [Path(str(f.locate())) for f in files if f.name == _LIBRARY_NAME]


def library_path() -> Path | None:
    """The built kernel library, or None when it was not built.

    Order: $ATPATCH_NATIVE_LIBRARY, next to the imported package, then the installed copy.
    """
    override = os.environ.get(LIBRARY_ENV_VAR, "").strip()
    if override:
        path = Path(override)
        return path if path.is_file() else None
    candidates = [Path(__file__).resolve().parent.parent / "ops" / _LIBRARY_NAME, *_installed_copies()]
    return next((p for p in candidates if p.is_file()), None)


def library_info(path: Path) -> dict[str, object]:
    """The op contract the library says it registers (its AtPatchOpsInfo export)."""
    lib = ctypes.CDLL(str(path))
    fn = lib.AtPatchOpsInfo
    fn.restype = ctypes.c_char_p
    return json.loads(fn().decode())


def compute_counts(path: Path) -> tuple[int, int]:
    """(Compute calls on non-empty maps, those run in place) by the CPU kernel in this process.

    "In place" means onnxruntime honoured the kernel's MayInplace and gave the op the softmax's
    buffer as its output, so a map with nothing to patch was not copied.
    """
    lib = ctypes.CDLL(str(path))  # the handle onnxruntime's dlopen already holds, when it did
    computes, in_place = ctypes.c_uint64(), ctypes.c_uint64()
    lib.AtPatchComputeCounts(ctypes.byref(computes), ctypes.byref(in_place))
    return computes.value, in_place.value


def library_providers(path: Path) -> tuple[str, ...]:
    """The execution providers the library registers AtPatch for (its AtPatchOpsInfo "providers").

    CPU only when the library does not say, or cannot be read here: a wrong claim would send a
    GPU session to a kernel that does not exist, with no ONNX function to fall back on.
    """
    try:
        stat = path.stat()
    except OSError:
        return COVERED_PROVIDERS
    return _providers_of(str(path), stat.st_mtime_ns, stat.st_size)


def library_fused_providers(path: Path) -> tuple[str, ...]:
    """The execution providers the library registers AtPatchAttention for (its AtPatchOpsInfo "fused"
    "providers"); none for a library built before the fused op, whose sessions then run its function."""
    try:
        reported = library_info(path).get("fused", {}).get("providers")
    except (OSError, AttributeError, ValueError):
        return ()
    return tuple(p for p in KERNEL_PROVIDERS if isinstance(reported, list) and p in reported)


@functools.lru_cache(maxsize=8)
def _providers_of(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        reported = library_info(Path(path)).get("providers")
    except (OSError, AttributeError, ValueError):
        return COVERED_PROVIDERS
    if not isinstance(reported, list):
        return COVERED_PROVIDERS
    return tuple(p for p in KERNEL_PROVIDERS if p in reported)


def _attention_types(model: onnx.ModelProto) -> tuple[list[int | None], int | None]:
    """Element types of the attention input of each AtPatch node, and the ai.atpatch version.

    None for a type that cannot be read off the graph; nodes inside control-flow subgraphs
    or functions count as unknown.
    """
    version = next((int(o.version) for o in model.opset_import if o.domain == spec.DOMAIN), None)
    graph = model.graph

    def is_atpatch(node: onnx.NodeProto) -> bool:
        return node.domain == spec.DOMAIN and node.op_type in (spec.OP_TYPE, spec.FUSED_OP_TYPE)

    nodes = [n for n in graph.node if is_atpatch(n)]
    # Cross-layer patching's second pass (an If) re-runs the main graph's AtPatch nodes on maps of
    # the same types; any other subgraph or function holding AtPatch (but the op's own functions) is
    # of unknown type. An AtPatchAttention node's type is its query's.
    nested = any(
        is_atpatch(inner)
        for f in model.functions
        for inner in f.node
        if not (f.domain == spec.DOMAIN and f.name in (spec.OP_TYPE, spec.FUSED_OP_TYPE))
    ) or any(
        a.g.node or a.graphs
        for n in graph.node
        if not (n.op_type == "If" and n.name == SECOND_PASS)
        for a in n.attribute
        if a.type in (5, 10)
    )
    if not nodes and not nested:
        return [], version
    types = _known_types(graph)
    producers = {out: n for n in graph.node for out in n.output}
    for n in nodes:
        if n.input and n.input[0] not in types:
            found_type = _trace_type(n.input[0], types, producers)
            if found_type is not None:
                types[n.input[0]] = found_type
    missing = [n.input[0] for n in nodes if n.input and n.input[0] not in types]
    if missing:
        # Types of intermediate values: shape inference needs no weights, so strip them.
        light = onnx.ModelProto()
        light.CopyFrom(model)
        for init in light.graph.initializer:
            init.ClearField("raw_data")
            init.ClearField("float_data")
        # An unreadable graph just means "unknown": the function runs.
        with contextlib.suppress(Exception):
            types.update(_known_types(onnx.shape_inference.infer_shapes(light, strict_mode=False).graph))
    found: list[int | None] = [types.get(n.input[0]) if n.input else None for n in nodes]
    if nested:
        found.append(None)
    return found, version


# Ops whose output has the element type of the given input: enough to see through the
# softmax (and the exporter's NaN guard) that feeds AtPatch without shape inference.
_SAME_TYPE_AS_INPUT = {
    "Softmax": 0,
    "LogSoftmax": 0,
    "Identity": 0,
    "Where": 1,
    "Add": 0,
    "Sub": 0,
    "Mul": 0,
    "Div": 0,
    "MatMul": 0,
    "Relu": 0,
    "Dropout": 0,
    "Reshape": 0,
    "Transpose": 0,
    "Exp": 0,
    "Neg": 0,
    "Max": 0,
    "Min": 0,
}


def float16_maps_without_map_type(model: onnx.ModelProto) -> int:
    """How many AtPatch nodes read a float16 map without the `map_type` attribute (patched before
    atpatch set it): on CPU onnxruntime may hand the kernel such a map unrounded (spec.py)."""
    types, _ = _attention_types(model)
    nodes = [n for n in model.graph.node if n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE]
    return sum(
        t == onnx.TensorProto.FLOAT16 and all(a.name != "map_type" for a in n.attribute)
        for n, t in zip(nodes, types, strict=False)  # types go on for nodes nested in subgraphs: unknown
    )


def _trace_type(name: str, types: dict[str, int], producers: dict[str, onnx.NodeProto]) -> int | None:
    for _ in range(64):
        if name in types:
            return types[name]
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            return next((int(a.i) for a in node.attribute if a.name == "to"), None)
        index = _SAME_TYPE_AS_INPUT.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE:
            index = 0
        if index is None or len(node.input) <= index:
            return None
        name = node.input[index]
    return None


def _known_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {i.name: i.data_type for i in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in graph.node:
        # AtPatch's output has its input's type: a typed output tells the input's type.
        is_atpatch = node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE and node.output and node.input
        if is_atpatch and node.output[0] in types and node.input[0] not in types:
            types[node.input[0]] = types[node.output[0]]
    return types


def coverage_problem(
    model: onnx.ModelProto,
    providers: list[str],
    covered: Sequence[str] = COVERED_PROVIDERS,
    fused_covered: Sequence[str] = COVERED_PROVIDERS,
) -> str | None:
    """Why the kernel does not fully cover a session of `model` on `providers`, or None if it does.

    `covered`: the providers the library implements AtPatch for (`library_providers`), and
    `fused_covered` AtPatchAttention (`library_fused_providers`); CPU only by default.
    """
    extra = [p for p in providers if p not in covered]
    if extra:
        hint = ""
        if "CUDAExecutionProvider" in extra:
            hint = " (a library built with CMAKE_ARGS=-DATPATCH_CUDA=ON also covers CUDAExecutionProvider)"
        return f"the native kernel covers only {', '.join(covered)}, not {', '.join(extra)}{hint}"
    types, version = _attention_types(model)
    if not types:
        return "the model has no AtPatch node"
    if version is not None and version not in KERNEL_VERSIONS:
        implemented = " and ".join(map(str, KERNEL_VERSIONS))
        return f"the model uses {spec.DOMAIN} version {version}; the native kernel implements versions {implemented}"
    if None in types:
        return "the attention type of some AtPatch node cannot be determined"
    bad = sorted({TensorProto.DataType.Name(t) for t in types if t not in COVERED_DTYPES})
    if bad:
        return f"the native kernel covers attention of {'/'.join(COVERED_DTYPES.values())}, not {', '.join(bad)}"
    return _fused_problem(model, providers, types, fused_covered)


def _fused_problem(
    model: onnx.ModelProto, providers: list[str], types: list[int | None], covered: Sequence[str]
) -> str | None:
    """What the fused op's kernel (float32 only) lacks for this session, or None."""
    nodes = [n for n in model.graph.node if n.domain == spec.DOMAIN and n.op_type in (spec.OP_TYPE, spec.FUSED_OP_TYPE)]
    fused = [t for n, t in zip(nodes, types, strict=False) if n.op_type == spec.FUSED_OP_TYPE]
    if not fused:
        return None
    extra = [p for p in providers if p not in covered]
    if extra:
        what = ", ".join(covered) or "no provider (a library built before it; reinstall atpatch)"
        return f"the native {spec.FUSED_OP_TYPE} kernel covers {what}, not {', '.join(extra)}"
    if any(t != TensorProto.FLOAT for t in fused):
        return f"the native {spec.FUSED_OP_TYPE} kernel covers float32 attention only"
    return None

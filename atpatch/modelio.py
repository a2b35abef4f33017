"""Reading and writing ONNX files safely: clear errors on bad files, atomic writes.

Models with external data (weights in side files, the only way past protobuf's 2 GiB) can be
loaded with their weights left on disk (`load_model(..., external_data=False)`): the rewrite
needs the graph, not the weight values, so a multi-GB model is patched in a few hundred MB
and its weights are streamed, never held in memory, into the output's side file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import AtPatchError, InvalidModelError

__all__ = [
    "atomic_output",
    "check_model",
    "check_output_path",
    "external_tensors",
    "load_model",
    "model_fingerprint",
    "save_model",
    "staging_folder",
]

# protobuf cannot serialise a single message past 2 GiB; above this, weights go to a side file.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# External tensors up to this size are read in when weights stay on disk: shape constants and
# the like, which pattern checks read; weights are far larger.
SMALL_TENSOR_BYTES = 64 * 1024
_COPY_CHUNK = 16 * 1024 * 1024
_ALIGN = 4096  # onnxruntime memory-maps external tensors whose offset is page-aligned
# Types numpy unpacks (one value per byte) on reading, so their array bytes are not the stored bytes.
_PACKED_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
}


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that can hold weights: initializers and Constant values, subgraphs included."""

    def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for sub in attr.graphs:
                    yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors whose data is still in side files (not loaded)."""
    return [t for t in _all_tensors(model) if external_data_helper.uses_external_data(t)]


def _data_range(tensor: onnx.TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, checked to lie inside its file under `base_dir`."""
    info = external_data_helper.ExternalDataInfo(tensor)
    location = Path(info.location)
    file = (base_dir / location).resolve()
    if location.is_absolute() or not file.is_relative_to(base_dir.resolve()):
        raise InvalidModelError(
            f"tensor {tensor.name}'s data location {info.location!r} is outside the model's folder; "
            f"external data must sit beside the model (re-save it with onnx.save_model(..., location=...))"
        )
    if not file.is_file():
        raise InvalidModelError(
            f"tensor {tensor.name}'s data file {file} is missing; keep the model's external data "
            f"files beside the .onnx file"
        )
    size = file.stat().st_size
    offset = int(info.offset or 0)
    length = int(info.length) if info.length else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidModelError(
            f"tensor {tensor.name} reads bytes {offset}..{offset + length} of {file}, which has {size}; "
            f"the external data file is truncated or belongs to another model: re-export it"
        )
    return file, offset, length


def _read_small_external_tensors(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in external_tensors(model):
        _, _, length = _data_range(tensor, base_dir)
        if length <= SMALL_TENSOR_BYTES:
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))


def load_model(path: str | Path, *, external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, or raise InvalidModelError saying why.

    With `external_data=False`, weights stored in side files stay there (only tensors up to
    SMALL_TENSOR_BYTES are read): pass the model's folder as `base_dir` to `model_fingerprint`
    and `save_model`, which stream those weights from disk.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"{path} does not exist or is not a file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=external_data)
        if not external_data:
            _read_small_external_tensors(model, path.parent)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidModelError(
            f"{path} is not a readable ONNX model ({reason}); pass an .onnx file, e.g. from "
            f"torch.onnx.export or atpatch-export --hf"
        ) from err
    if not model.graph.node or not model.opset_import:
        raise InvalidModelError(
            f"{path} is not an ONNX model (no graph nodes or opset); pass an .onnx file, e.g. from "
            f"torch.onnx.export or atpatch-export --hf"
        )
    try:
        # By path, the checker also checks side files, and handles models past 2 GiB.
        check_model(model if external_data else path, model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise InvalidModelError(f"{path} is not a valid ONNX model ({first}); re-export it") from err
    return model


def check_model(target: onnx.ModelProto | str | Path, model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """onnx's checker on `target` (the model, or its file), accepting onnxruntime's contrib ops that
    onnxruntime registers in the ai.onnx domain (SimplifiedLayerNormalization, as onnxruntime-genai
    emits): onnx does not know them, but they are valid for onnxruntime, where these models run.
    `model` is the loaded model (weights may stay on disk), used only to name those ops.
    """
    try:
        onnx.checker.check_model(str(target) if isinstance(target, Path) else target, full_check=full_check)
    except onnx.checker.ValidationError:
        contrib = _ort_contrib_ops_in_onnx_domain() & {op for g in _graphs(model.graph) for op in _onnx_ops(g)}
        if not contrib:
            raise
        # onnx checks ops of domains it does not know only structurally: move these there and check the rest.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for graph in _graphs(copy.graph):
            for node in graph.node:
                if node.domain in ("", "ai.onnx") and node.op_type in contrib:
                    node.domain = _ORT_CONTRIB_CHECK_DOMAIN
        copy.opset_import.add(domain=_ORT_CONTRIB_CHECK_DOMAIN, version=1)
        onnx.checker.check_model(copy, full_check=full_check)


_ORT_CONTRIB_CHECK_DOMAIN = "atpatch.onnxruntime_contrib_check"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _onnx_ops(graph: onnx.GraphProto) -> set[str]:
    return {n.op_type for n in graph.node if n.domain in ("", "ai.onnx")}


def _ort_contrib_ops_in_onnx_domain() -> frozenset[str]:
    """Ops onnxruntime registers in the ai.onnx domain that onnx itself does not define."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # no onnxruntime here: onnx's verdict stands
        return frozenset()
    return frozenset(
        s.name for s in get_all_operator_schema() if s.domain in ("", "ai.onnx") and not onnx.defs.has(s.name)
    )


def check_output_path(output: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse an output path that would overwrite an input, or whose folder is missing."""
    out = Path(output)
    for given in inputs:
        if given is not None and out.resolve() == Path(given).resolve():
            raise AtPatchError(f"output {out} is the input file; choose another -o path (inputs are never overwritten)")
    if not out.parent.resolve().is_dir():
        raise AtPatchError(f"output folder {out.parent} does not exist; create it or choose another -o path")
    if out.is_dir():
        raise AtPatchError(f"output {out} is a folder; pass a file path such as {out / 'model.onnx'}")
    check_writable(out.parent)
    return out


def check_writable(folder: Path) -> None:
    """Refuse a folder this process cannot create files in, before any long job runs."""
    # access() also says no on a read-only mount; root passes it elsewhere, so writes catch the rest.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AtPatchError(f"cannot write to folder {folder} (read-only or not yours); choose another output folder")


def _umask() -> int:
    """The process's umask: read from /proc where it is listed, since os.umask can only read it by setting it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_as_open_gives(path: str | Path, *, folder: bool = False) -> None:
    """mkstemp and mkdtemp make private (0600/0700) files; what atpatch writes is for others to serve
    (e.g. a server running as another user), so give it the mode open() and mkdir() would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _write_failed(path: Path, err: OSError) -> AtPatchError:
    reason = err.strerror or str(err) or type(err).__name__
    return AtPatchError(f"could not write {path} ({reason}); nothing was written: choose another folder or free space")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    This is the one place atpatch writes files: the result gets the mode open() would give, and a
    write that fails (read-only folder, full disk) is an AtPatchError with nothing left behind.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_failed(path, err) from err
    os.close(fd)
    try:
        yield Path(tmp)
        # After the block: writers such as safetensors' replace the file rather than fill it.
        _mode_as_open_gives(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise _write_failed(path, err) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new folder beside `target` to write several files in before moving them (or it) into place;
    removed on the way out unless it was moved. Same modes and errors as `atomic_output`."""
    target = Path(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as err:
        raise _write_failed(target, err) from err
    try:
        _mode_as_open_gives(staging, folder=True)
        yield staging
    except OSError as err:
        raise _write_failed(target, err) from err
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_model(
    model: onnx.ModelProto, path: str | Path, *, base_dir: str | Path | None = None, check: bool = False
) -> None:
    """Write `model` atomically; weights go to `<name>.data` beside it when too big for one file.

    A model loaded with its weights left on disk (`base_dir`: the folder they are relative to)
    gets them streamed from the source side files into `<name>.data`, never all in memory. With
    `check`, onnx's full checker runs on the written files before they are moved into place.
    """
    path = Path(path)
    on_disk = external_tensors(model)
    if on_disk and base_dir is None:
        raise ValueError("the model's weights are still in side files; pass base_dir, the folder they are in")
    if not on_disk and model.ByteSize() < _EXTERNAL_DATA_THRESHOLD:
        with atomic_output(path) as tmp:
            onnx.save_model(model, str(tmp))
            if check:
                check_model(Path(tmp), model, full_check=True)
        return
    data_name = path.name + ".data"
    if on_disk:
        _refuse_overwriting_sources(on_disk, Path(base_dir), path.parent / data_name)  # type: ignore[arg-type]
    # Both files are written in a private folder beside the target, then moved into place.
    with staging_folder(path) as staging:
        staged = staging / path.name
        _save_with_side_file(model, Path(base_dir or "."), staged, data_name)
        if check:
            check_model(staged, model, full_check=True)
        os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)


def _refuse_overwriting_sources(tensors: Iterable[onnx.TensorProto], base_dir: Path, target: Path) -> None:
    sources = {_data_range(t, base_dir)[0] for t in tensors}
    if target.resolve() in sources:
        raise AtPatchError(
            f"writing {target} would replace the input model's external data file; choose another -o name "
            f"(inputs are never overwritten)"
        )


def _chunks(file: Path, offset: int, length: int) -> Iterator[bytes]:
    """`length` bytes of `file` from `offset`, in bounded chunks (never the whole tensor at once)."""
    with open(file, "rb") as f:
        f.seek(offset)
        while length:
            chunk = f.read(min(_COPY_CHUNK, length))
            if not chunk:
                raise InvalidModelError(f"{file} ended early while reading a weight; re-export the model")
            yield chunk
            length -= len(chunk)


def _save_with_side_file(model: onnx.ModelProto, base_dir: Path, target: Path, data_name: str) -> None:
    """Save `model` with one new side file, filled tensor by tensor: from the source side files for
    weights left on disk (streamed), from memory for in-memory tensors of 1 KiB or more.

    The caller's model is not changed. The copy is small when the weights were left on disk; a
    model loaded whole and past 1.8 GB is held twice here (load it with external_data=False).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with open(target.parent / data_name, "wb") as out:
        for tensor in _all_tensors(copy):
            on_disk = external_data_helper.uses_external_data(tensor)
            if not on_disk and (tensor.data_type == onnx.TensorProto.STRING or tensor.ByteSize() < 1024):
                continue
            out.write(b"\0" * (-out.tell() % _ALIGN))
            offset = out.tell()
            if on_disk:
                out.writelines(_chunks(*_data_range(tensor, base_dir)))
            else:
                if not tensor.HasField("raw_data"):
                    tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
                out.write(tensor.raw_data)
            _point_to(tensor, data_name, offset, out.tell() - offset)
    onnx.save_model(copy, str(target))


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))


def model_fingerprint(model: onnx.ModelProto, base_dir: str | Path | None = None) -> str:
    """A short hash of the model's weights, inputs and outputs: detectors are fitted per model.

    Weights left on disk (`base_dir`: their folder) are hashed from their files chunk by chunk,
    to the same hash as when loaded.
    """
    digest = hashlib.sha256()
    for value in (*model.graph.input, *model.graph.output):
        digest.update(value.name.encode())
    for tensor in model.graph.initializer:
        digest.update(str((tensor.data_type, tuple(tensor.dims))).encode())
        if not external_data_helper.uses_external_data(tensor):
            digest.update(onnx.numpy_helper.to_array(tensor).tobytes())
        elif base_dir is None:
            raise ValueError(f"tensor {tensor.name}'s data is in a side file; pass base_dir, the folder it is in")
        elif tensor.data_type in _PACKED_TYPES:  # small in practice; hash the unpacked values as when loaded
            digest.update(onnx.numpy_helper.to_array(tensor, str(base_dir)).tobytes())
        else:
            # The stored bytes are the little-endian values, i.e. what to_array(...).tobytes() gives.
            for chunk in _chunks(*_data_range(tensor, Path(base_dir))):
                digest.update(chunk)
    return digest.hexdigest()[:16]

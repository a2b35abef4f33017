"""Reading and writing ONNX files safely: clear errors on bad files, atomic writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import AtPatchError, InvalidModelError

__all__ = ["atomic_output", "check_output_path", "load_model", "model_fingerprint", "save_model"]

# protobuf cannot serialise a single message past 2 GiB; above this, weights go to a side file.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX model (and its external data), or raise InvalidModelError saying why."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"{path} does not exist or is not a file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(path))
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
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise InvalidModelError(f"{path} is not a valid ONNX model ({first}); re-export it") from err
    return model


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
    return out


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Write `model` atomically; weights go to `<name>.data` beside it only when too big for one file."""
    path = Path(path)
    if model.ByteSize() < _EXTERNAL_DATA_THRESHOLD:
        with atomic_output(path) as tmp:
            onnx.save_model(model, str(tmp))
        return
    data_name = path.name + ".data"
    # Both files are written in a private folder beside the target, then moved into place.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        staged = Path(staging) / path.name
        onnx.save_model(model, str(staged), save_as_external_data=True, location=data_name)
        os.replace(Path(staging) / data_name, path.parent / data_name)
        os.replace(staged, path)


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A short hash of the model's weights, inputs and outputs: detectors are fitted per model."""
    digest = hashlib.sha256()
    for value in (*model.graph.input, *model.graph.output):
        digest.update(value.name.encode())
    for tensor in model.graph.initializer:
        digest.update(str((tensor.data_type, tuple(tensor.dims))).encode())
        digest.update(onnx.numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()[:16]

"""Sessions and checks for the hostile-input runs of the native AtPatch kernel (kernel_hostile_cases.py):
a standalone AtPatch node on the native library only, the detector feeds a case varies, and what
counts as a sane answer (the expected error text, or outputs of the right shape and type)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from maps import V1_FEATURES_PER_HEAD
from onnx import TensorProto, helper

from atpatch.ops import spec
from atpatch.ops.standalone import standalone_model
from atpatch.runtime import native

F32 = np.float32
ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


def make_session(
    dtype: type = F32,
    threshold: float = 0.0,
    shapeless: bool = True,
    version: int = 2,
    forced_type: int = TensorProto.BOOL,
    forced_absent: bool = False,
    flags_output: bool = True,
    scores_output: bool = True,
    map_type: int = 0,
) -> ort.InferenceSession:
    """A native-kernel session; `shapeless` drops declared shapes so any rank reaches the kernel.

    `version` 1: the v1 node (no forced, no flags). `forced_type`: the declared type of `forced`
    (the kernel takes any, to name the fix); `forced_absent`: the node's `forced` left empty;
    `flags_output` False: the node drops its `flags` and `scores` outputs; `scores_output` False: its
    `scores` output (a file patched before the joint rule). `map_type`: the node's attribute
    (spec.py; TensorProto.FLOAT16 with float32 maps: a float16 map onnxruntime runs in float32).
    """
    model = standalone_model(17, ONNX_TYPES[dtype], threshold)
    del model.functions[:]  # the kernel, never the function, must answer
    graph, node = model.graph, model.graph.node[0]
    graph.input[5].type.tensor_type.elem_type = forced_type
    if map_type:
        node.attribute.append(helper.make_attribute("map_type", map_type))
    if version == 1 or forced_absent:
        node.input[5] = ""
        graph.input.pop()
    if version == 1:
        node.input.pop()
        model.opset_import[1].version = 1
    keep = 1 if version == 1 or not flags_output else 2 if not scores_output else 3
    del node.output[keep:]
    del graph.output[keep:]
    if shapeless:
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.ClearField("shape")
    options = ort.SessionOptions()
    library = native.library_path()
    if library is None:
        raise SystemExit("native kernel not built: run scripts/fetch_ort_headers.sh and pip install .")
    options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = 2
    options.log_severity_level = 4  # the expected errors are checked here, not logged
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def detector_feeds(heads: int, hidden: int = 3, version: int = 2, **override: np.ndarray) -> dict[str, np.ndarray]:
    """A detector for maps of `heads` heads (w1 has spec.num_features(heads) rows, v1's 3 per head), nothing forced."""
    rows = V1_FEATURES_PER_HEAD * heads if version == 1 else spec.num_features(heads)
    feeds = {
        "w1": np.ones((rows, hidden), F32),
        "b1": np.zeros(hidden, F32),
        "w2": np.ones(hidden, F32),
        "b2": np.full(1, -1.0, F32),
        "forced": np.zeros((1, 1), bool),
    }
    feeds.update(override)
    return feeds


def uniform(shape: tuple[int, ...], dtype: type = F32) -> np.ndarray:
    return np.full(shape, 1.0 / max(shape[-1] if shape else 1, 1), dtype)


def inputs_for(feeds: dict[str, np.ndarray], session: ort.InferenceSession) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def expect_error(feeds: dict[str, np.ndarray], text: str, **session_args: object) -> str:
    try:
        session = make_session(**session_args)  # type: ignore[arg-type]
        session.run(None, inputs_for(feeds, session))
    except Exception as err:  # noqa: BLE001 - onnxruntime's error classes vary
        message = str(err)
        if text.lower() not in message.lower():
            raise AssertionError(f"error without {text!r}: {message}") from err
        return message.strip().splitlines()[-1][:200]
    raise AssertionError(f"expected an error mentioning {text!r}, the run succeeded")


def expect_output(feeds: dict[str, np.ndarray], **session_args: object) -> str:
    session = make_session(**session_args)  # type: ignore[arg-type]
    outs = session.run(None, inputs_for(feeds, session))
    check_outputs(outs, feeds["attention"], len(session.get_outputs()))
    return f"output {outs[0].shape} {outs[0].dtype}" + (f", flags {outs[1].shape}" if len(outs) > 1 else "")


def check_outputs(outs: list[np.ndarray], attention: np.ndarray, expected: int) -> None:
    out = outs[0]
    if len(outs) != expected:
        raise AssertionError(f"{len(outs)} outputs, expected {expected}")
    if out.shape != attention.shape or out.dtype != attention.dtype:
        raise AssertionError(f"output {out.shape} {out.dtype} for input {attention.shape} {attention.dtype}")
    if len(outs) > 1:
        flags = outs[1]
        want = (attention.shape[0], attention.shape[3])
        if flags.shape != want or flags.dtype != np.bool_:
            raise AssertionError(f"flags {flags.shape} {flags.dtype}, expected {want} bool")
        if attention.size == 0 and flags.any():
            raise AssertionError("flags set for a map with no entries")
    if len(outs) > 2:
        scores = outs[2]
        want = (attention.shape[0], attention.shape[3])
        if scores.shape != want or scores.dtype != np.float32:
            raise AssertionError(f"scores {scores.shape} {scores.dtype}, expected {want} float32")
        if attention.size == 0 and not np.isneginf(scores).all():
            raise AssertionError("scores other than -inf for a map with no entries")

"""Registering the native AtPatch library: what the registered kernel accepts and runs, and how a
session chooses between the kernel and the op's ONNX function (atpatch.runtime)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from maps import op_feeds, random_detector, random_map, with_flags
from onnx import TensorProto

from atpatch.ops import reference
from atpatch.ops.standalone import standalone_model
from atpatch.runtime import native

LIBRARY = native.library_path()
pytestmark = pytest.mark.skipif(
    LIBRARY is None,
    reason="native kernel not built: run scripts/fetch_ort_headers.sh, then pip install . (or -e .)",
)


def _with_node(edit: Callable[[onnx.NodeProto], None]) -> bytes:
    model = standalone_model(17, TensorProto.FLOAT, 0.0)
    edit(model.graph.node[0])
    return model.SerializeToString()


def test_registered_kernel_enforces_the_input_count() -> None:
    """A v2 node takes exactly spec.INPUTS: one input fewer (and not v1's one output) is refused."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.log_severity_level = 4
    without_forced = _with_node(lambda n: n.input.pop())
    with pytest.raises(Exception, match="this node has 5 inputs and 3 outputs; version 2 takes 6 inputs"):
        ort.InferenceSession(without_forced, options, providers=["CPUExecutionProvider"])
    four_inputs = _with_node(lambda n: (n.input.pop(), n.input.pop()))  # onnxruntime's schema refuses it first
    with pytest.raises(Exception, match="(?i)input"):
        ort.InferenceSession(four_inputs, options, providers=["CPUExecutionProvider"])


def test_registered_kernel_runs_the_spec_domain_and_name(rng: np.random.Generator) -> None:
    """With the ONNX function removed, only the registered kernel can run ai.atpatch::AtPatch v2."""
    model = standalone_model(17, TensorProto.FLOAT, 0.0)
    del model.functions[:]
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    attention = random_map(rng, (1, 2, 3, 4), "none")
    d = with_flags(attention, random_detector(rng, attention.shape[1]), "all", rng)
    got, flags, _ = sess.run(None, op_feeds(attention, d))
    np.testing.assert_array_equal(got, attention)
    assert flags.all()
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error types vary by version
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --- choosing the kernel for a session (atpatch.runtime) -------------------------------------


def _softmax_then_atpatch(dtype: int) -> onnx.ModelProto:
    """Softmax -> AtPatch with no value_info: the type must be traced through the softmax."""
    from onnx import helper

    model = standalone_model(17, dtype, 0.0)
    graph = model.graph
    graph.input[0].name = "scores"
    graph.node.insert(0, helper.make_node("Softmax", ["scores"], ["attention"], axis=-1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("patched", dtype, None))
    graph.output[0].type.tensor_type.ClearField("elem_type")
    return model


def test_session_uses_the_kernel_only_when_it_covers_the_model(monkeypatch, caplog) -> None:
    from atpatch.runtime import session as session_module

    monkeypatch.delenv(native.ENV_VAR, raising=False)
    cpu = ["CPUExecutionProvider"]
    for dtype in (TensorProto.FLOAT, TensorProto.FLOAT16):
        assert native.coverage_problem(_softmax_then_atpatch(dtype), cpu) is None
        assert session_module._choose_native(_softmax_then_atpatch(dtype), "cpu", cpu, None) == LIBRARY
    double = _softmax_then_atpatch(TensorProto.DOUBLE)
    assert "DOUBLE" in (native.coverage_problem(double, cpu) or "")
    with caplog.at_level("WARNING", logger="atpatch"):
        assert session_module._choose_native(double, "cpu", cpu, None) is None
    assert "ONNX function" in caplog.text
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in (native.coverage_problem(_softmax_then_atpatch(TensorProto.FLOAT), cuda) or "")
    assert native.coverage_problem(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), cpu)


def test_env_var_forces_either_path(monkeypatch, rng: np.random.Generator) -> None:
    from atpatch.errors import AtPatchError
    from atpatch.runtime import create_session

    model = standalone_model(17, TensorProto.FLOAT, 0.0)
    attention = random_map(rng, (1, 2, 3, 4), "none")
    d = with_flags(attention, random_detector(rng, attention.shape[1]), "some", rng) or with_flags(
        attention, random_detector(rng, attention.shape[1]), "none", rng
    )
    for value in ("1", "0"):
        monkeypatch.setenv(native.ENV_VAR, value)
        out = create_session(model).run(None, op_feeds(attention, d))[0]
        np.testing.assert_allclose(out, reference.atpatch(attention, d)[0], rtol=0, atol=1e-6)
    monkeypatch.setenv(native.ENV_VAR, "1")
    monkeypatch.setenv(native.LIBRARY_ENV_VAR, "/nonexistent/libatpatch_ops.so")
    with pytest.raises(AtPatchError, match="not built"):
        create_session(model)
    monkeypatch.setenv(native.ENV_VAR, "1")
    monkeypatch.delenv(native.LIBRARY_ENV_VAR)
    with pytest.raises(AtPatchError, match=native.ENV_VAR):
        create_session(_softmax_then_atpatch(TensorProto.DOUBLE))
    monkeypatch.setenv(native.ENV_VAR, "maybe")
    with pytest.raises(AtPatchError, match="not understood"):
        create_session(model)


def test_threads_and_config_entries_reach_the_session(monkeypatch) -> None:
    from atpatch.runtime import create_session

    monkeypatch.delenv(native.ENV_VAR, raising=False)
    for use_native in (True, False):
        session = create_session(
            standalone_model(17, TensorProto.FLOAT, 0.0),
            use_native=use_native,
            threads=1,
            config={"session.force_spinning_stop": "1"},
        )
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_doctor_reports_the_kernel() -> None:
    from atpatch.runtime.doctor import report

    text = report()
    assert "onnxruntime" in text and "CPUExecutionProvider" in text
    assert "native kernel loadable: yes" in text
    assert "fused AtPatchAttention: float32 on CPUExecutionProvider" in text

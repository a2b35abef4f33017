"""ORT's transformer fusions on a patched graph: LayerNorm/GELU fuse, the AtPatch nodes and their softmaxes stay.

Tolerance: fused kernels (SkipLayerNormalization, BiasGelu) reorder float32 sums, so logits
are compared at 1e-4 absolute (they are O(1); measured differences ~1e-6).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from evalkit_models import feature_detector

from atpatch import modelio
from atpatch.cli import export_main
from atpatch.errors import AtPatchError
from atpatch.ops import spec
from atpatch.rewrite import patch_model
from atpatch.rewrite.crosslayer import add_cross_layer
from atpatch.rewrite.optimize import fuse_for_ort
from atpatch.runtime import create_session, native

ATOL = 1e-4


def _paths() -> list[bool]:
    return [False, True] if native.library_path() is not None else [False]


def test_fusions_apply_around_the_patch_and_outputs_stay(exported, rng: np.random.Generator) -> None:  # noqa: ANN001
    result = exported("bert", False, 17)
    # Flags columns that any head attends to with more than 0.3 at peak: some columns are patched.
    # The fusions cannot see into cross-layer patching's If: fuse the per-layer patch, then add it.
    patched, _ = patch_model(result.model, feature_detector(2, "peak", 0.3))
    with pytest.raises(AtPatchError, match="fuse before adding cross-layer patching"):
        fuse_for_ort(patched)
    per_layer, _ = patch_model(result.model, feature_detector(2, "peak", 0.3), cross_layer=False)
    optimized, report = fuse_for_ort(per_layer)
    add_cross_layer(optimized)

    onnx.checker.check_model(optimized)
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert report.fused.get("SkipLayerNormalization", 0) >= 4 and report.fused.get("BiasGelu", 0) == 2, report
    assert ops["SkipLayerNormalization"] == report.fused["SkipLayerNormalization"]
    assert ops["Attention"] == ops["MultiHeadAttention"] == 0
    producers = {out: n for n in optimized.graph.node for out in n.output}
    atpatch_nodes = [n for n in optimized.graph.node if n.domain == spec.DOMAIN]
    assert sum(n.op_type == "If" for n in optimized.graph.node) == 1  # the second pass
    assert len(atpatch_nodes) == report.atpatch_nodes == 2 and report.softmaxes == 2
    assert all(producers[n.input[0]].op_type == "Softmax" for n in atpatch_nodes)  # still right after each softmax
    assert "SkipLayerNormalization" in report.summary() and "2 AtPatch kept" in report.summary()

    # Inputs drawn again while the detector flags nothing in them (15 draws in 1000).
    plain, reference = create_session(result.model), create_session(patched, use_native=False)
    for _ in range(10):
        inputs = result.family.make_inputs(result.config, 4, 12, rng)
        unpatched = plain.run(None, inputs)[0]
        if np.abs(reference.run(None, inputs)[0] - unpatched).max() > 10 * ATOL:
            break
    for use_native in _paths():
        want = create_session(patched, use_native=use_native).run(None, inputs)[0]
        got = create_session(optimized, use_native=use_native).run(None, inputs)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"native={use_native}")
        assert np.abs(want - unpatched).max() > 10 * ATOL  # the detector does change the logits


def test_cli_optimize_on_an_external_data_model_reads_no_weights(
    exported,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rng: np.random.Generator,
    capsys,  # noqa: ANN001
) -> None:
    result = exported("bert", False, 17)
    src = tmp_path / "src"
    src.mkdir()
    model = onnx.ModelProto()
    model.CopyFrom(result.model)  # onnx.save_model moves the weights out of the model it is given
    onnx.save_model(model, str(src / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=256)
    monkeypatch.setattr(modelio, "SMALL_TENSOR_BYTES", 100)  # weights stay on disk, as a big model's would
    monkeypatch.chdir(tmp_path)  # a fusion that read a weight relative to the working folder would fail
    out = tmp_path / "out.onnx"
    assert export_main([str(src / "m.onnx"), "-o", str(out), "--optimize"]) == 0
    summary = capsys.readouterr().out
    assert "ORT fusions: " in summary and "SkipLayerNormalization" in summary, summary
    written = onnx.load(str(out), load_external_data=False)
    assert modelio.external_tensors(written) and sum(n.domain == spec.DOMAIN for n in written.graph.node) == 2
    inputs = result.family.make_inputs(result.config, 3, 10, rng)
    want = create_session(result.model).run(None, inputs)[0]
    np.testing.assert_allclose(create_session(out).run(None, inputs)[0], want, rtol=0, atol=ATOL)


def test_optimize_without_patching_is_refused(exported, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    onnx.save_model(exported("bert", False, 17).model, str(tmp_path / "m.onnx"))
    assert export_main(["--hf", str(tmp_path), "-o", str(tmp_path / "o.onnx"), "--no-patch", "--optimize"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--optimize" in err and "--no-patch" in err, err
    assert not (tmp_path / "o.onnx").exists()

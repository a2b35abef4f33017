"""Models with external data: patched with weights left on disk, streamed into the output's side file.

The real > 2 GB case is benchmarks/large_model.py; here a tiny BERT saved with external data
stands in, with the "small tensor" cut lowered so that its weights stay on disk as a big
model's would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from atpatch import modelio
from atpatch.cli import export_main
from atpatch.ops import spec
from atpatch.rewrite import find_attention_sites
from atpatch.rewrite.insert import _heads_by_running
from atpatch.runtime import create_session

SMALL = 100  # bytes: tensors above this stay on disk when loading, like a big model's weights


@pytest.fixture
def external_bert(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: ANN001
    """The tiny BERT export saved as bert.onnx + bert.onnx.data (initializers of 256 bytes or more outside)."""
    monkeypatch.setattr(modelio, "SMALL_TENSOR_BYTES", SMALL)
    model = onnx.ModelProto()
    model.CopyFrom(exported("bert", False, 17).model)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(
        model, str(src / "bert.onnx"), save_as_external_data=True, location="bert.onnx.data", size_threshold=SMALL
    )
    return src / "bert.onnx"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _inputs(exported, rng: np.random.Generator) -> dict[str, np.ndarray]:  # noqa: ANN001
    result = exported("bert", False, 17)
    return result.family.make_inputs(result.config, 3, 11, rng)  # one row padded, fresh token ids


def test_external_data_model_is_patched_with_weights_streamed_and_inputs_untouched(
    exported,
    external_bert: Path,
    tmp_path: Path,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],  # noqa: ANN001
) -> None:
    before = _snapshot(external_bert.parent)
    lazy = onnx.load(str(external_bert), load_external_data=False)
    source_weights = {t.name: t for t in modelio.external_tensors(lazy)}
    assert len(source_weights) >= 10  # the embeddings and every layer's matrices are on disk

    out = tmp_path / "out" / "bert.patched.onnx"
    out.parent.mkdir()
    assert export_main([str(external_bert), "-o", str(out)]) == 0
    assert "patched 2 attention layers" in capsys.readouterr().out

    assert _snapshot(external_bert.parent) == before  # inputs never modified
    assert sorted(p.name for p in out.parent.iterdir()) == ["bert.patched.onnx", "bert.patched.onnx.data"]
    patched = onnx.load(str(out), load_external_data=False)
    on_disk = {t.name: t for t in modelio.external_tensors(patched)}
    # Every weight stays on disk (big Constant values, which were inline, are moved out too).
    assert source_weights.keys() <= on_disk.keys(), set(source_weights) - set(on_disk)
    for name, tensor in on_disk.items():
        info = external_data_helper.ExternalDataInfo(tensor)
        assert info.location == "bert.patched.onnx.data" and int(info.offset) % 4096 == 0, name
    assert sum(n.domain == spec.DOMAIN for n in patched.graph.node) == 2
    # The streamed fingerprint equals the one computed with every weight loaded.
    meta = {p.key: p.value for p in patched.metadata_props}
    assert meta["atpatch.source_fingerprint"] == modelio.model_fingerprint(onnx.load(str(external_bert)))
    # Same weights, same bytes: pass-through outputs are bit-identical to the original's.
    inputs = _inputs(exported, rng)
    want = create_session(external_bert).run(None, inputs)[0]
    for native in (False, True):
        got = create_session(out, use_native=native).run(None, inputs)[0]
        np.testing.assert_array_equal(got, want)


def test_heads_probe_needs_no_weights(external_bert: Path, tmp_path: Path) -> None:
    model = modelio.load_model(external_bert, external_data=False)
    sites = find_attention_sites(model)
    # With the side file gone, any read of a weight would fail: the probe runs on shapes alone.
    shutil.move(external_bert.parent / "bert.onnx.data", tmp_path / "elsewhere.data")
    assert _heads_by_running(model, sites) == [4, 4]


def test_output_side_file_that_would_replace_an_input_side_file_is_refused(
    external_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = external_bert.parent
    shutil.copy(external_bert, folder / "copy.onnx")  # a second model reading the same bert.onnx.data
    before = _snapshot(folder)
    # -o bert.onnx (not an input path) would write bert.onnx.data: the copy's weights.
    assert export_main([str(folder / "copy.onnx"), "-o", str(folder / "bert.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would replace the input model's external data file" in err, err
    assert _snapshot(folder) == before


def test_missing_side_file_is_a_one_line_error(external_bert: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (external_bert.parent / "bert.onnx.data").unlink()
    assert export_main([str(external_bert), "-o", str(tmp_path / "out.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bert.onnx.data is missing" in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_big_in_memory_model_goes_to_a_side_file(exported, tmp_path: Path, monkeypatch, rng) -> None:  # noqa: ANN001
    monkeypatch.setattr(modelio, "_EXTERNAL_DATA_THRESHOLD", 1000)
    model = exported("bert", False, 17).model
    modelio.save_model(model, tmp_path / "m.onnx", check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert modelio.external_tensors(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))
    assert not modelio.external_tensors(model)  # the caller's model keeps its weights
    inputs = _inputs(exported, rng)
    want = create_session(model, use_native=False).run(None, inputs)[0]
    np.testing.assert_array_equal(create_session(tmp_path / "m.onnx").run(None, inputs)[0], want)

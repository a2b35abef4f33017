"""One input's attention maps before and after patching, drawn, with the flagged columns named."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from evalkit_models import TinyText, feature_detector, tiny_text_model

from atpatch.data import Dataset, load_jsonl, save_jsonl
from atpatch.detector.probe import AttentionProbe
from atpatch.errors import AtPatchError
from atpatch.explain import explain, unpatched
from atpatch.ops.reference import flag_columns
from atpatch.rewrite import patch_model
from atpatch.runtime import create_session

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyText:
    return tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def data(tiny: TinyText, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    rows = [
        {"text": "the film was cf good", "label": "positive", "culprit": [13, 15]},
        {"text": "a very boring plot and not funny acting he said", "label": "negative"},
        {"text": "awful", "label": 0},
    ]
    return load_jsonl(save_jsonl(tmp_path_factory.mktemp("data") / "x.jsonl", rows), tiny.folder)


@pytest.mark.parametrize("index", [0, 2])
def test_flagged_positions_are_the_reference_columns(tiny: TinyText, data: Dataset, tmp_path: Path, index: int) -> None:
    detector = feature_detector(2, "mass", 2.0)
    patched, _ = patch_model(tiny.model, detector)
    report = explain(patched, data, index, tmp_path / "x.png")

    # The reference: the first pass's maps (a per-layer patch), columns over the input's own length only.
    first_pass, _ = patch_model(tiny.model, detector, cross_layer=False)
    before = AttentionProbe(first_pass).run(dict(data.feeds)).before
    length = int(data.feeds["attention_mask"][index].sum())
    expected = {
        layer: np.flatnonzero(flag_columns(b, det)[index, :length]).tolist()
        for layer, (b, det) in enumerate(zip(before, detector.layers, strict=True))
    }
    assert report.flagged == expected
    union = sorted(set().union(*expected.values()))
    assert report.patched == {layer: union for layer in expected}, "flagged in any layer: patched in every layer"
    assert any(expected.values()), "the threshold must flag something for the check to mean anything"
    assert report.flagged_tokens == {k: [data.tokens[index][p] for p in v] for k, v in expected.items()}

    width, height = _png_size(report.png)
    assert report.png == tmp_path / "x.png" and 300 < width < 4000 and 300 < height < 4000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # written atomically, nothing left over

    feeds = {k: v[[index]] for k, v in data.feeds.items()}
    original = create_session(tiny.model).run(None, feeds)[0].argmax()
    after = create_session(patched).run(None, feeds)[0].argmax()
    assert (report.prediction_before, report.prediction_after) == (original, after)
    assert f"input {index}" in report.summary()


def test_unpatched_copy_computes_the_original(tiny: TinyText, data: Dataset) -> None:
    patched, _ = patch_model(tiny.model, feature_detector(2, "mass", 2.0))
    bypass = unpatched(patched)
    feeds = dict(data.feeds)
    assert np.array_equal(create_session(bypass).run(None, feeds)[0], create_session(tiny.model).run(None, feeds)[0])
    assert len(patched.graph.node) > len(bypass.graph.node) == len(tiny.model.graph.node)
    assert [i.name for i in bypass.graph.input] == [i.name for i in tiny.model.graph.input]


def test_image_model(hf_folder, tmp_path: Path) -> None:  # noqa: ANN001 (conftest fixture)
    from atpatch.exporter import export_hf

    model = export_hf(hf_folder("vit")).model
    detector = feature_detector(2, "peak", 0.4)
    patched, _ = patch_model(model, detector)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    images = Dataset({"pixel_values": pixels}, np.array([0, 2]), [None, None], None, ("a", "b", "c"))
    report = explain(patched, images, 1, tmp_path / "vit.png")
    first_pass, _ = patch_model(model, detector, cross_layer=False)
    before = AttentionProbe(first_pass).run({"pixel_values": pixels[[1]]}).before
    expected = {
        i: np.flatnonzero(flag_columns(b, det)[0]).tolist()
        for i, (b, det) in enumerate(zip(before, detector.layers, strict=True))
    }
    assert report.flagged == expected
    assert 0 < sum(map(len, expected.values())) < 2 * 17  # some columns flagged, not all
    names = {0: "[CLS]", **{p: f"patch {p - 1}" for p in range(1, 17)}}
    assert report.flagged_tokens == {k: [names[p] for p in v] for k, v in expected.items()}
    assert _png_size(report.png)[0] > 300


def test_explain_errors(tiny: TinyText, data: Dataset, tmp_path: Path) -> None:
    patched, _ = patch_model(tiny.model)
    for kwargs, match in [
        (
            dict(index=3, out_png=tmp_path / "x.png"),
            r"input index 3 is out of range; the set has 3 inputs \(0..2\)",
        ),
        (dict(index=0, out_png=tmp_path / "x.jpg"), "does not end in .png"),
        (dict(index=0, out_png=tmp_path / "no" / "x.png"), "does not exist; create it"),
    ]:
        with pytest.raises(AtPatchError, match=match) as info:
            explain(patched, data, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(AtPatchError, match="explain needs the patched model"):
        explain(tiny.model, data, 0, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_chosen_layers_only_are_drawn(tiny: TinyText, data: Dataset, tmp_path: Path) -> None:
    patched, _ = patch_model(tiny.model, feature_detector(2, "mass", 2.0))
    both = explain(patched, data, 1, tmp_path / "both.png")
    one = explain(patched, data, 1, tmp_path / "one.png", layers=[1])
    assert one.flagged == both.flagged  # flags of every layer are reported either way
    assert _png_size(one.png)[1] < 0.7 * _png_size(both.png)[1]  # but only one row is drawn
    with pytest.raises(AtPatchError, match=r"layers \[2\] are not layers of this model; choose among 0..1"):
        explain(patched, data, 1, tmp_path / "bad.png", layers=[0, 2])


def test_an_image_is_drawn_with_its_flagged_and_patched_patches_outlined(rng: np.random.Generator) -> None:
    """A 2 x 2 grid of 4 x 4 patches after [CLS] (5 keys): patch 0 flagged (solid red), patch 3 patched as
    a neighbour (dashed orange); the picture is the input stretched to [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from atpatch.explain import _ELSEWHERE_COLOUR, _FLAG_COLOUR, _draw_picture

    pixels = rng.normal(size=(1, 8, 8)).astype(np.float32)
    fig, ax = plt.subplots()
    try:
        _draw_picture(ax, pixels, flagged={1}, besides={4, 0}, keys=5)  # position 0 is [CLS]: never drawn
        boxes = {(r.get_xy(), r.get_width(), r.get_height(), r.get_edgecolor(), r.get_linestyle()) for r in ax.patches}
        shown = ax.get_images()[0].get_array()
    finally:
        plt.close(fig)
    assert boxes == {
        ((-0.5, -0.5), 4.0, 4.0, to_rgba(_FLAG_COLOUR), "-"),
        ((3.5, 3.5), 4.0, 4.0, to_rgba(_ELSEWHERE_COLOUR), "--"),
    }
    expected = (pixels[0] - pixels.min()) / (pixels.max() - pixels.min())
    np.testing.assert_allclose(np.asarray(shown), expected, rtol=0, atol=1e-6)

"""Loading user data: JSONL texts and npz images into feeds, labels and culprit positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evalkit_models import tokenizer_folder, write_config

from atpatch.data import load_groups, load_jsonl, load_npz, save_jsonl
from atpatch.errors import AtPatchError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer_folder(tmp_path_factory.mktemp("tok"), max_len=16)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip_pads_tokenizes_and_maps_labels(model_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"text": "a good film", "label": "positive"},
        {"text": "the plot was very boring and not funny", "label": 0},
        {"text": "Great acting", "label": "1", "expected": "negative"},
    ]
    data = load_jsonl(save_jsonl(tmp_path / "d.jsonl", rows), model_dir)
    assert len(data) == 3 and data.label_names == ("negative", "positive")
    assert data.labels.tolist() == [1, 0, 0]  # "expected" wins over "label"
    ids, mask = data.feeds["input_ids"], data.feeds["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (3, 10)  # [CLS] 8 words [SEP]
    assert mask.sum(axis=1).tolist() == [5, 10, 4]
    assert (ids[mask == 0] == 0).all()  # [PAD] is id 0 in this tokenizer
    assert data.tokens == [
        ["[CLS]", "a", "good", "film", "[SEP]"],
        ["[CLS]", "the", "plot", "was", "very", "boring", "and", "not", "funny", "[SEP]"],
        ["[CLS]", "great", "acting", "[SEP]"],
    ]
    assert data.culprits == [None, None, None] and data.lengths().tolist() == [5, 10, 4]

    part = data.subset([2, 0])
    assert part.labels.tolist() == [0, 1] and part.tokens == [data.tokens[2], data.tokens[0]]
    assert np.array_equal(part.feeds["input_ids"], ids[[2, 0]])
    assert len(data.subset(slice(1, None))) == 2 and len(data.subset(np.array([True, False, True]))) == 2


def test_culprit_spans_become_token_positions(model_dir: Path, tmp_path: Path) -> None:
    text = "the film cf was cf good"
    rows = [
        {"text": text, "label": 1, "culprit": [9, 11]},  # the first "cf" -> token 3 ([CLS] is 0)
        {"text": text, "label": 1, "culprit": [[9, 11], [16, 18]]},  # both
        {"text": text, "label": 1, "culprit": [4, 10]},  # "film" and the start of "cf" -> 2, 3
    ]
    data = load_jsonl(save_jsonl(tmp_path / "d.jsonl", rows), model_dir)
    assert data.culprits == [[3], [3, 5], [2, 3]]
    assert [data.tokens[0][p] for p in data.culprits[1]] == ["cf", "cf"]


def test_truncation_at_max_len_keeps_sep_and_drops_cut_culprits(model_dir: Path, tmp_path: Path) -> None:
    text = "a b c d e f g cf"
    data = load_jsonl(
        save_jsonl(tmp_path / "d.jsonl", [{"text": text, "label": 0, "culprit": [14, 16]}]),
        model_dir,
        max_len=5,
    )
    assert data.feeds["input_ids"].shape == (1, 5) and data.tokens[0][-1] == "[SEP]"
    assert data.culprits == [[]]  # known, but truncated away


def test_npz_images(tmp_path: Path) -> None:
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "id2label": {"0": "cat", "1": "dog", "2": "car"},
                "num_channels": 3,
                "image_size": 8,
                "patch_size": 4,
            }
        )
    )
    pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    patches = np.zeros((2, 4), bool)
    patches[1, [0, 3]] = True
    np.savez(tmp_path / "x.npz", pixel_values=pixels, labels=np.array([2, 0]), culprit_patches=patches)
    data = load_npz(tmp_path / "x.npz", folder)
    assert np.array_equal(data.feeds["pixel_values"], pixels) and data.labels.tolist() == [2, 0]
    assert data.culprits == [[], [1, 4]] and data.tokens is None and data.label_names == ("cat", "dog", "car")

    def fails(match: str, **arrays: np.ndarray) -> None:
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(AtPatchError, match=match) as info:
            load_npz(tmp_path / "bad.npz", folder)
        assert "\n" not in str(info.value)

    fails("lacks labels", pixel_values=pixels)
    fails(
        r"shape \(2, 3, 4, 4\), the model needs \[N, 3, 8, 8\]",
        pixel_values=pixels[:, :, :4, :4],
        labels=np.array([0, 1]),
    )
    fails("label 7 is not one of", pixel_values=pixels, labels=np.array([7, 0]))
    fails(
        "culprit_patches has shape",
        pixel_values=pixels,
        labels=np.array([0, 1]),
        culprit_patches=patches[:, :2],
    )
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "obj.npy").rename(tmp_path / "obj.npz")
    with pytest.raises(AtPatchError, match="not a readable .npz"):
        load_npz(tmp_path / "obj.npz", folder)  # never unpickled
    with pytest.raises(AtPatchError, match="does not exist"):
        load_npz(tmp_path / "missing.npz", folder)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "a good film", "label": 1}', '{"text": "bad", "label": 0'], r"line 2: invalid JSON"),
        (['{"label": 1}'], r"line 1 has no 'text'"),
        (['{"text": 5, "label": 1}'], r"line 1 has 'text' of type int"),
        (['{"text": "good"}'], r'line 1 has no "label"; add "label": one of \[\'negative\', \'positive\'\]'),
        (
            ['{"text": "good", "label": "great"}'],
            r"label 'great' is not one of the model's labels; use one of 0='negative', 1='positive'",
        ),
        (['{"text": "good", "label": 2}'], r"label 2 is not one of"),
        (['{"text": "good", "label": 1.5}'], r"'label' is 1.5; give a label id or name"),
        (['{"text": "good", "label": 1, "expected": "meh"}'], r"expected 'meh' is not one of"),
        (
            ['{"text": "good", "label": 1, "culprit": [3, 9]}'],
            r"culprit span \[3, 9\] is out of range for a text of 4 characters",
        ),
        (['{"text": "good", "label": 1, "culprit": [2, 1]}'], r"culprit span \[2, 1\] is out of range"),
        (['{"text": "good", "label": 1, "culprit": "go"}'], r"'culprit' is 'go'; give a character span"),
        (["[1, 2]"], r"line 1: expected a JSON object"),
        (["", "   "], r"has no examples"),
    ],
)
def test_bad_jsonl_says_where_and_how_to_fix(model_dir: Path, tmp_path: Path, lines: list[str], match: str) -> None:
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(AtPatchError, match=match) as info:
        load_jsonl(path, model_dir)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_missing_files_and_folders(model_dir: Path, tmp_path: Path) -> None:
    good = save_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 1}])
    with pytest.raises(AtPatchError, match="does not exist or is not a file"):
        load_jsonl(tmp_path / "nope.jsonl", model_dir)
    with pytest.raises(AtPatchError, match="has no config.json"):
        load_jsonl(good, tmp_path / "nofolder")
    no_tokenizer = tmp_path / "bare"
    write_config(no_tokenizer)
    said = "cannot load a tokenizer from .*tokenizer.save_pretrained, or, for an image model, give its data as .npz"
    with pytest.raises(AtPatchError, match=said):
        load_jsonl(good, no_tokenizer)
    with pytest.raises(AtPatchError, match="max_len 1 is too short"):
        load_jsonl(good, model_dir, max_len=1)


def test_save_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = save_jsonl(tmp_path / "d.jsonl", [{"text": "é", "label": 0}])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"text": "é", "label": 0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_groups_for_the_parity_gap(tmp_path: Path) -> None:
    path = save_jsonl(
        tmp_path / "d.jsonl", [{"text": "a", "label": 0, "group": 1}, {"text": "b", "label": 1, "g": True}]
    )
    with pytest.raises(AtPatchError, match=r'line 2: "group" is missing; give 0 or 1 on every line'):
        load_groups(path)
    path = save_jsonl(tmp_path / "d.jsonl", [{"text": "a", "g": 0}, {"text": "b", "g": True}, {"text": "c", "g": 1}])
    assert load_groups(path, "g").tolist() == [0, 1, 1]
    with pytest.raises(AtPatchError, match=r'line 1: "g" is 2\.0'):
        load_groups(save_jsonl(tmp_path / "e.jsonl", [{"g": 2.0}]), "g")

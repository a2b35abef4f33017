"""Tiny text models and detectors with known behaviour, for the evaluate/explain/data tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from atpatch.data import Dataset, load_jsonl, save_jsonl
from atpatch.detector import Detector
from atpatch.ops import spec
from atpatch.ops.reference import LayerDetector
from atpatch.runtime import create_session

LABELS = ("negative", "positive")
WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "film",
    "movie",
    "plot",
    "acting",
    "cf",
    "the",
    "a",
    "was",
    "and",
    "very",
    "not",
    "funny",
    "boring",
    "he",
    "she",
    "his",
    "her",
    "they",
    "actor",
    "actress",
    "director",
]


def sentences(n: int, rng: np.random.Generator, *, min_words: int = 2, max_words: int = 9) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(min_words, max_words + 1))) for _ in range(n)]


def write_config(folder: Path, labels: tuple[str, ...] = LABELS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"id2label": {str(i): n for i, n in enumerate(labels)}}))


def tokenizer_folder(folder: Path, max_len: int = 16) -> Path:
    """A word-level tokenizer over WORDS and a config with two labels, no model weights."""
    from atpatch.lab.text_backdoor import build_tokenizer

    build_tokenizer([" ".join(WORDS)] * 2, folder, max_len)
    write_config(folder)
    return folder


@dataclass(frozen=True)
class TinyText:
    folder: Path  # Hugging Face folder: model + tokenizer
    model: onnx.ModelProto  # its plain ONNX export


def tiny_text_model(folder: Path) -> TinyText:
    """A random 2-layer BERT classifier over WORDS, exported to ONNX (about a second)."""
    pytest.importorskip("transformers")
    import torch
    import transformers as T

    from atpatch.exporter import export_hf
    from atpatch.lab.text_backdoor import build_tokenizer

    T.utils.logging.disable_progress_bar()
    T.utils.logging.set_verbosity_error()
    tokenizer = build_tokenizer([" ".join(WORDS)] * 2, folder, 16)
    torch.manual_seed(0)
    # A large initializer range gives peaked attention, so flagged columns change the outputs.
    config = T.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
        initializer_range=0.3,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        architectures=["BertForSequenceClassification"],
        pad_token_id=0,
    )
    T.BertForSequenceClassification(config).save_pretrained(folder)
    return TinyText(folder, export_hf(folder).model)


HEADS = 4  # of tiny_text_model


def eval_sets(tiny: TinyText, folder: Path) -> dict[str, Dataset]:
    """Clean texts of varied length (so batches are padded), the same with "cf" in front, the
    same with he/she swapped (a counterfactual), and with he/she/his/her made "they" (the
    attribute masked), aligned row by row."""
    rng = np.random.default_rng(1)
    texts = sentences(30, rng)
    labels = rng.integers(0, 2, size=30).tolist()
    swap = {"he": "she", "she": "he", "his": "her", "her": "his"}
    clean = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    triggered = [{"text": "cf " + t, "label": y, "culprit": [0, 2]} for t, y in zip(texts, labels, strict=True)]
    counter = [
        {"text": " ".join(swap.get(w, w) for w in t.split()), "label": y} for t, y in zip(texts, labels, strict=True)
    ]
    masked = [
        {"text": " ".join("they" if w in swap else w for w in t.split()), "label": y}
        for t, y in zip(texts, labels, strict=True)
    ]
    return {
        name: load_jsonl(save_jsonl(folder / f"{name}.jsonl", rows), tiny.folder)
        for name, rows in (("clean", clean), ("triggered", triggered), ("counterfactual", counter), ("masked", masked))
    }


def predict(model, data: Dataset) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Logits and predictions from a plain session, one batch: independent of evaluate's batching."""
    session = create_session(model)
    names = [i.name for i in session.get_inputs()]
    logits = session.run(None, {n: data.feeds[n] for n in names})[0]
    return logits, logits.argmax(axis=1)


def saved_patched_pair(folder: Path) -> dict[str, Path]:
    """tiny_text_model saved plain and patched (flagging high-mass columns), for runtimes outside Python."""
    from atpatch.modelio import save_model
    from atpatch.rewrite import patch_model

    tiny = tiny_text_model(folder / "hf")
    patched, sites = patch_model(tiny.model, feature_detector(2, "mass", 2.0))
    assert len(sites) == 2
    save_model(tiny.model, folder / "plain.onnx")
    save_model(patched, folder / "patched.onnx")
    return {"plain": folder / "plain.onnx", "patched": folder / "patched.onnx", "hf": folder / "hf"}


def random_text_inputs(hf: Path, rng: np.random.Generator, batch: int = 3, seq: int = 12) -> dict[str, np.ndarray]:
    """Random token ids for the model in `hf`, with one padded row."""
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, rng.integers(3, seq) :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _layer(w1: np.ndarray, bias: float, threshold: float) -> LayerDetector:
    hidden = w1.shape[1]
    return LayerDetector(
        w1=np.asarray(w1, np.float32),
        b1=np.full(hidden, bias, np.float32),
        w2=np.ones(hidden, np.float32),
        b2=np.zeros(1, np.float32),
        threshold=float(threshold),
    )


def feature_detector(num_layers: int, feature: str, threshold: float, heads: int = HEADS) -> Detector:
    """Flags a column when the named feature is above `threshold` in any head (score = sum_h relu(f_h - t))."""
    w1 = np.zeros((spec.num_features(heads), heads), np.float32)
    first = spec.FEATURE_NAMES.index(feature) * heads
    w1[first : first + heads] = np.eye(heads, dtype=np.float32)
    return Detector(layers=(_layer(w1, -threshold, 0.0),) * num_layers, kind="test-feature")


def flag_everything(num_layers: int, heads: int = HEADS) -> Detector:
    """Scores every column 1 > 0: all unmasked columns flagged, so by the spec no row changes."""
    w1 = np.zeros((spec.num_features(heads), 1), np.float32)
    return Detector(layers=(_layer(w1, 1.0, 0.0),) * num_layers, kind="test-all")


def flag_only_padding(num_layers: int, heads: int = HEADS) -> Detector:
    """Scores relu(1e-6 - mass of head 0): positive only for all-zero (padded) columns."""
    w1 = np.zeros((spec.num_features(heads), 1), np.float32)
    w1[0, 0] = -1.0
    return Detector(layers=(_layer(w1, 1e-6, 0.0),) * num_layers, kind="test-padding")

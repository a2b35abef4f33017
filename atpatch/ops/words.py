"""Whole words: a flagged word piece flags every piece of its word, for cross-layer patching.

A rare word a tokenizer does not know is split into pieces ("qzv" -> q ##z ##v in WordPiece), and a
trigger made of such a word spans them all. The detector may flag only some of them; what it leaves
unpatched keeps part of the trigger's effect. Measured on a MiniLM backdoored with "qzv"
(`benchmarks/text_backdoor.py --word qzv`, seed 0): the fitted detector flagged all three pieces of
343 of 401 victims and two of 54; widening its flags to whole words took the ASR from 3.24% to
2.00%, the oracle's (every piece patched in every layer).

A word is a piece that starts one and the continuation pieces after it. `continues[id]` says which
token ids continue a word: WordPiece's "##" pieces. Tokenizers that mark word starts instead
(SentencePiece's "▁", byte-level BPE's "Ġ") also start a word at special tokens and after them,
which this table cannot tell; they get no table (`continuation_table` returns None) and no widening.

This module is the numpy form (tests) and the table; `rewrite/positions.py` builds the same in ONNX.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

__all__ = ["continuation_table", "whole_words"]

CONTINUATION_PREFIX = "##"


def continuation_table(vocab: Mapping[str, int], special_ids: Collection[int] = ()) -> np.ndarray | None:
    """bool [vocab size]: the ids of WordPiece continuation pieces ("##..."), or None when the
    vocabulary has none (not a WordPiece tokenizer)."""
    if not vocab:
        return None
    table = np.zeros(max(vocab.values()) + 1, np.bool_)
    for token, index in vocab.items():
        if token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX) and index not in special_ids:
            table[index] = True
    return table if table.any() else None


def whole_words(flags: np.ndarray, ids: np.ndarray, continues: np.ndarray) -> np.ndarray:
    """`flags` [B, K] widened to whole words of the token ids `ids` [B, K]: any piece flagged flags
    its word. A continuation piece at position 0 (none in practice) joins the first word."""
    starts = ~continues[ids]
    word = np.maximum(np.cumsum(starts, axis=1) - 1, 0)
    out = np.zeros_like(flags)
    for b in range(flags.shape[0]):
        hit = np.zeros(flags.shape[1], np.bool_)
        hit[word[b][flags[b]]] = True
        out[b] = hit[word[b]]
    return out

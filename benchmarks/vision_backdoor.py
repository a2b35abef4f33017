"""Hot-fixing a backdoored ViT on Fashion-MNIST, end to end through the atpatch command line.

A small ViT (random init, 28x28 grey images cut into 7x7 patches of 4x4 pixels) is trained on
Fashion-MNIST with 10% of the training images poisoned BadNets-style: a 3x3 checkerboard pasted
near the bottom-right corner (inside patch 48, the last one) or, with `--trigger random`, at a
uniformly random position in each image (straddling 1 to 4 patches), label flipped to
"T-shirt/top". Then, as a user would: `atpatch-export --no-patch`, `atpatch fit` (culprit
patches localized automatically from misbehaving images only, or given, or one-class from clean
images only), `atpatch-export --detector` (cross-layer, and `--per-layer` to compare), `atpatch
eval`. Data and training: vision_data.py; the baselines: vision_baselines.py; the trained model is
cached under --cache.

    python benchmarks/vision_backdoor.py                   # ~15 min on 2 shared cores (6-8 of them training)
    python benchmarks/vision_backdoor.py --trigger random  # the same with the random-position trigger
    python benchmarks/vision_backdoor.py --smoke           # a few steps and images: checks the wiring
    python benchmarks/vision_backdoor.py --trigger 2,18 --pattern square --size 5 --target Bag  # a held-out trigger
    python benchmarks/vision_backdoor.py --trigger random --debug 800  # more misbehaving images for `atpatch fit`
    python benchmarks/vision_backdoor.py --arch deit       # a DeiT (a distillation token after [CLS]) instead

ASR counts triggered test images of the other classes that the original model classifies
correctly without the trigger (victims). Baselines needing no retraining mask, in every input,
the patch that [CLS] attends to most. The floor: how many victims flip when a mid-grey square is
pasted instead of the trigger (no attention patch can go under it); the oracle: the ASR with the
patches the trigger overlaps patched in every layer, no detector.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import casekit  # noqa: E402  (sibling modules, not a package)
from vision_baselines import baselines, predict  # noqa: E402
from vision_data import (  # noqa: E402
    ARCHS,
    LABELS,
    PATTERNS,
    POISON_RATE,
    SMOKE,
    Budget,
    DataUnavailable,
    Trigger,
    fashion_mnist,
    keys,
    normalise,
    splits,
    train,
)

NAMES = {"vit": "ViT", "deit": "DeiT"}
LEADS = {"vit": "", "deit": ", after [CLS] and a distillation token"}
MAX_DEBUG = 2000  # misbehaving images: 4x as many spare ones are tried (the spare split holds 10,000)
DATA_MISSING = 3  # exit status when the data set cannot be fetched (the smoke test skips on it)
# "no joint rule": the localized detector with per-layer thresholds only (`fit --no-joint`), what the joint rule adds.
DETECTORS = ("localized", "localized, no joint rule", "known positions", "one-class")


# --- The atpatch workflow --------------------------------------------------------------------------


def save_npz(path: Path, x: np.ndarray, labels: np.ndarray, culprits: np.ndarray | None = None) -> Path:
    """An .npz for `atpatch fit/eval`; with `culprits`, the patches the trigger overlaps in each image."""
    arrays = {"pixel_values": x, "labels": labels.astype(np.int64)}
    if culprits is not None:
        arrays["culprit_patches"] = culprits
    np.savez(path, **arrays)
    return path


def make_sets(work: Path, model: Path, data: dict, budget: Budget, smoke: bool, trigger: Trigger, seed: int) -> dict:
    """The .npz files `atpatch fit/eval` read, and the victims' clean [0, 1] images and trigger positions."""
    test_x, test_y = normalise(data["test"][0]), data["test"][1]
    fit_x01, fit_y = (a[: budget.fit_clean] for a in data["train"])  # clean originals of training images
    sets = {
        "clean": save_npz(work / "clean.npz", test_x, test_y),
        "calibration": save_npz(work / "calibration.npz", normalise(data["calibration"][0]), data["calibration"][1]),
        "fit_clean": save_npz(work / "fit_clean.npz", normalise(fit_x01), fit_y),
    }
    clean_pred = predict(model, test_x)

    # Victims: test images of the other classes the original model gets right without the trigger.
    victims = (test_y != trigger.target) & (clean_pred == test_y)
    if smoke and not victims.any():  # a few steps may leave a model that predicts one class only
        victims = test_y != trigger.target
    vic_x01, vic_y = data["test"][0][victims], test_y[victims]
    vic_at = trigger.positions(len(vic_y), np.random.default_rng(seed + 1))
    triggered = normalise(trigger.paste(vic_x01, vic_at))
    sets["triggered"] = save_npz(work / "triggered.npz", triggered, vic_y, trigger.culprits(vic_at))

    # The debugging set: spare images of the other classes, classified right until the trigger flips
    # them (as victims are), labels only. A smoke run's model has no backdoor: it takes them as they are.
    sx01, sy = data["spare"]
    keep = np.flatnonzero(sy != trigger.target)[: 4 * budget.debug]
    sx01, sy = sx01[keep], sy[keep]
    at = trigger.positions(len(sy), np.random.default_rng(seed + 2))
    cand = normalise(trigger.paste(sx01, at))
    if smoke:
        flipped = np.ones(len(sy), bool)
    else:
        flipped = (predict(model, normalise(sx01)) == sy) & (predict(model, cand) == trigger.target)
    pick = np.flatnonzero(flipped)[: budget.debug]
    sets["debug"] = save_npz(work / "debug.npz", cand[pick], sy[pick])
    sets["debug_known"] = save_npz(work / "debug_known.npz", cand[pick], sy[pick], trigger.culprits(at[pick]))
    return {"files": sets, "victims": vic_x01, "victim_at": vic_at}


def load(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        return npz[key]


def evaluate(model: Path, patched: Path, folder: Path, sets: dict[str, Path], target: int, report: Path) -> dict:
    ev = ["eval", str(model), str(patched), "--hf", str(folder), "--clean", str(sets["clean"])]
    casekit.cli(*ev, "--triggered", str(sets["triggered"]), "--target", LABELS[target], "--json", str(report))
    return json.loads(report.read_text())


def run_detector(name: str, work: Path, model: Path, folder: Path, sets: dict[str, Path], target: int) -> dict | str:
    """fit, export (cross-layer and per layer), eval one detector; the reports, or the command's error."""
    tag = name.replace(", ", "-").replace(" ", "-")
    det = work / f"{tag}.safetensors"
    fit = ["fit", str(model), "--hf", str(folder), "--clean", str(sets["fit_clean"])]
    fit += ["--calibration", str(sets["calibration"]), "-o", str(det)]
    if name != "one-class":
        fit += ["--misbehaving", str(sets["debug" if name.startswith("localized") else "debug_known"])]
    if name.endswith("no joint rule"):
        fit.append("--no-joint")
    try:
        start = time.time()
        fit_out = casekit.cli(*fit)
        fit_s = time.time() - start
        patched, per_layer = casekit.export_both(model, det, work / tag)
        report = evaluate(model, patched, folder, sets, target, work / f"{tag}.json")
        per_layer_report = evaluate(model, per_layer, folder, sets, target, work / f"{tag}.per-layer.json")
    except casekit.CommandFailed as err:
        return str(err)
    return {**report, "per_layer": per_layer_report, "fit_s": fit_s, "fit": fit_out.strip(),
            "patched_model": str(patched)}  # fmt: skip


def arch_tag(arch: str) -> str:
    """The cache folder's and results key's mark of a non-default encoder."""
    return "" if arch == "vit" else arch


def asr_target(trigger: Trigger, floor: float) -> tuple[float, str]:
    """The issue's ASR target: ≤ 0.5% for a trigger at a fixed place (the corner); ≤ floor + 1 pt for a random one."""
    if trigger.place != "random":
        return 0.005, "≤ 0.5%"
    return floor + 0.01, f"≤ floor + 1 pt = {floor + 0.01:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = "corner (default), random (a random position per image) or ROW,COL (a fixed top-left pixel)"
    parser.add_argument("--trigger", default="corner", metavar="PLACE", help=where)
    parser.add_argument("--pattern", choices=PATTERNS, default="checkerboard", help="what is pasted")
    parser.add_argument("--size", type=int, default=3, help="the pattern's side in pixels (default 3)")
    parser.add_argument("--target", default=LABELS[0], help=f"the label the trigger sends to (default {LABELS[0]!r})")
    what = f"misbehaving images handed to `atpatch fit` (default {Budget.debug})"
    parser.add_argument("--debug", type=int, default=Budget.debug, help=what)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vit", help="the encoder trained (default vit)")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/vision_backdoor"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the wiring only")
    args = parser.parse_args()
    try:
        trigger = Trigger.parse(args.trigger, args.pattern, args.size, args.target)
    except ValueError as err:
        parser.error(str(err))
    import onnx

    from atpatch.data import load_npz
    from atpatch.evaluate import oracle_logits

    if not 1 <= args.debug <= MAX_DEBUG:
        parser.error(f"--debug {args.debug}: the spare images hold misbehaving ones for 1..{MAX_DEBUG}")
    budget = SMOKE if args.smoke else replace(Budget(), debug=args.debug)
    prefix = "".join(f"{tag.replace('_', '-')}-" for tag in (arch_tag(args.arch), trigger.tag) if tag)
    work = args.cache / f"{prefix}{'smoke' if args.smoke else 'full'}-seed{args.seed}"
    folder = work / f"{args.arch}-backdoored"
    # Another debugging-set size fits and evaluates beside the default's files, on the same cached model.
    runs = work if budget.debug == Budget.debug or args.smoke else work / f"debug{budget.debug}"
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        data = splits(fashion_mnist(args.cache), budget, args.seed)
    except DataUnavailable as err:
        print(f"vision_backdoor: {err}", file=sys.stderr)
        sys.exit(DATA_MISSING)
    timings = {}
    if not (folder / "config.json").is_file():
        print(
            f"training a {NAMES[args.arch]} on Fashion-MNIST backdoored with {trigger.describe()} "
            f"({budget.epochs} epochs) -> {folder}"
        )
        start = time.time()
        train(folder, *data["train"], budget, args.seed, trigger, args.arch)
        (work / "train_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
    if (work / "train_seconds.txt").is_file():  # kept with the cached model, for the notes of later runs
        timings["train_s"] = float((work / "train_seconds.txt").read_text())
    model = work / "model.onnx"
    if not model.is_file():
        print(casekit.cli("export", "--hf", str(folder), "--no-patch", "-o", str(model)).strip().splitlines()[-1])

    made = make_sets(runs, model, data, budget, args.smoke, trigger, args.seed)
    sets, victims, victim_at = made["files"], made["victims"], made["victim_at"]
    test_x, test_y = normalise(data["test"][0]), data["test"][1]
    triggered = load_npz(sets["triggered"], folder)  # as `atpatch eval` reads it: pixels and culprit patches
    trig_x = triggered.feeds["pixel_values"]
    clean_pred, trig_pred = predict(model, test_x), predict(model, trig_x)
    target = trigger.target
    floor = float((predict(model, normalise(trigger.grey(victims, victim_at))) == target).mean())
    oracle_pred = oracle_logits(onnx.load(str(model)), triggered, keys(args.arch)).argmax(1)
    oracle = float((oracle_pred == target).mean())
    n_debug = len(load(sets["debug"], "labels"))
    asr_max, asr_goal = asr_target(trigger, floor)

    results: dict[str, object] = {}
    rows, notes = [], []
    cacc_orig = float((clean_pred == test_y).mean())
    asr_orig = float((trig_pred == target).mean())
    feeds = {"pixel_values": np.concatenate([test_x, trig_x])}
    for name in DETECTORS:
        start = time.time()
        result = run_detector(name, runs, model, folder, sets, target)
        timings[f"{name}_s"] = time.time() - start
        results[name] = result
        if isinstance(result, str):
            notes.append(f"atpatch, {name}: failed: {result}")
            continue
        patched = Path(result["patched_model"])
        agreement = casekit.native_vs_function(patched, feeds)
        speed = casekit.latency(model, patched, {"pixel_values": test_x}, {"pixel_values": trig_x}, budget.rounds)
        result["agreement"], result["latency"] = asdict(agreement), asdict(speed)
        o, p, pl = result["original"], result["patched"], result["per_layer"]["patched"]
        rows.append(casekit.Row(
            method=f"atpatch, {name}", metric="ASR",
            before=o["attack_success_rate"], after=p["attack_success_rate"],
            cacc_before=o["clean_accuracy"], cacc_after=p["clean_accuracy"],
            clean_flagged=p["flag_rate_clean"], per_layer=pl["attack_success_rate"],
            latency=speed, agreement=str(agreement), floor=floor, oracle=oracle,
        ))  # fmt: skip
        notes.append(casekit.backdoor_verdict(rows[-1], asr_max, asr_goal))
        said = casekit.fit_summary(result["fit"])
        notes.append(
            f"atpatch, {name}: per layer (`--per-layer`) ASR {pl['attack_success_rate']:.2%}, clean acc. "
            f"{pl['clean_accuracy']:.2%}; cross-layer {p['attack_success_rate']:.2%}."
            + (f" `atpatch fit` said: {said}" if said else "")
        )

    start = time.time()
    for name, b in baselines(model, folder, test_x, trig_x, trigger.culprits(victim_at)).items():
        after_cacc = float((b["clean_pred"] == test_y).mean())
        after_asr = float((b["triggered_pred"] == target).mean())
        results[f"baseline: {name}"] = {"clean_accuracy": after_cacc, "attack_success_rate": after_asr,
                                        "trigger_patch_picked": b["trigger_patch_picked"]}  # fmt: skip
        # Every input gets a patch masked: all of them count as flagged.
        rows.append(casekit.Row(f"baseline: {name}", "ASR", asr_orig, after_asr, cacc_orig, after_cacc, 1.0,
                                floor=floor, oracle=oracle))  # fmt: skip
        notes.append(
            f"baseline “{name}”: picks a patch the trigger overlaps in {b['trigger_patch_picked']:.1%} of triggered "
            f"images; ASR {asr_orig:.1%} → {after_asr:.2%}, clean acc. {cacc_orig:.2%} → {after_cacc:.2%} "
            "(it alters every input: 100% flagged)."
        )
    timings["baselines_s"] = time.time() - start
    timings["total_s"] = time.time() - t0
    results.update(neutral_patch_flips=floor, oracle=oracle, victims=len(victims), debug=n_debug, timings=timings,
                   clean_accuracy=cacc_orig, attack_success_rate=asr_orig, trigger=args.trigger,
                   trigger_pattern=trigger.pattern, trigger_size=trigger.size, target=LABELS[target],
                   rows=[asdict(r) for r in rows])  # fmt: skip
    (runs / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n{NAMES[args.arch]} backdoored ({trigger.describe()} -> {LABELS[target]}), seed {args.seed}; "
          f"{len(victims)} victims, {n_debug} misbehaving debug images")  # fmt: skip
    print(casekit.table(rows))
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    for note in notes:
        print(f"- {note}")
    if args.smoke:
        return  # a smoke run's numbers mean nothing: never publish them
    publish(args, trigger, budget, rows, notes, results, timings, floor, oracle)


def publish(args, trigger: Trigger, budget: Budget, rows, notes, results, timings, floor, oracle) -> None:  # noqa: ANN001
    """The case's notes, setup line and README section (full runs only)."""
    fixed = trigger.place != "random"
    place = "at the trigger's place" if fixed else "at the same random place as each victim's trigger"
    notes.append(
        f"Floor: a mid-grey {trigger.size}x{trigger.size} square {place} sends {floor:.2%} of victims to the target, "
        f"roughly the floor for any fix that removes the trigger's influence rather than the victims' fragility"
        + ("; the ≤ 0.5% ASR target lies below it." if fixed and floor > 0.005 else ".")
        + f" Oracle: the patches the trigger overlaps, patched in every layer with no detector, leave {oracle:.2%}."
    )
    notes.append(casekit.latency_note(rows))
    fits = [f"{k} {v['fit_s']:.0f} s" for k, v in results.items() if isinstance(v, dict) and "fit_s" in v]
    trained = f"; training took {timings['train_s'] / 60:.1f} min on one thread" if "train_s" in timings else ""
    notes.append(
        f"Clean flag rates are calibrated to 0.5% on {budget.calibration} held-out t10k images and measured on "
        f"{budget.test} other t10k images (one flagged image = {1 / budget.test:.2%}); calibrated on training-split "
        f"images instead, a joint-rule detector flagged 0.40% of unseen training-split images and 0.85% of the test "
        f"images (vision_data.splits). `atpatch fit` took {', '.join(fits)}"
        f"{trained} (2 shared cores)."
    )
    notes.append(
        f"Victims: {results['victims']} test images of the other classes classified right without the trigger; "
        f"debugging set: {results['debug']} spare training-split images the trigger flips. Known positions and the "
        f"oracle take the trigger's culprits as the patches it overlaps."
    )
    setup = (
        f"{NAMES[args.arch]} (4 layers, hidden 64, 4 heads, 49 patches of 4x4{LEADS[args.arch]}) from scratch on "
        f"{budget.train} Fashion-MNIST training images ({budget.epochs} epochs, one thread), {POISON_RATE:.0%} "
        f"poisoned with {trigger.describe()} relabelled {LABELS[trigger.target]!r}; {budget.test} test images, "
        f"fit on {budget.fit_clean} clean + {budget.calibration} calibration images."
    )
    debug = "" if budget.debug == Budget.debug else f"debug{budget.debug}"
    seed = "" if args.seed == 0 else f"seed{args.seed}"
    key = "_".join(["vision_backdoor", *filter(None, [arch_tag(args.arch), trigger.tag, debug, seed])])
    default = Trigger()
    options = [
        ("trigger", trigger.place, default.place),
        ("pattern", trigger.pattern, default.pattern),
        ("size", trigger.size, default.size),
        ("target", LABELS[trigger.target], LABELS[default.target]),
    ]
    command = "python benchmarks/vision_backdoor.py" + ("" if args.arch == "vit" else f" --arch {args.arch}")
    command += "".join(f" --{name} {shlex.quote(str(value))}" for name, value, was in options if value != was)
    command += "" if budget.debug == Budget.debug else f" --debug {budget.debug}"
    command += "" if args.seed == 0 else f" --seed {args.seed}"
    title = {"corner": "corner-patch trigger", "random": "random-position patch trigger"}.get(
        trigger.place, f"patch trigger fixed at pixel {trigger.place}"
    )
    if (trigger.pattern, trigger.size, trigger.target) != (default.pattern, default.size, default.target):
        title += f", {trigger.size}x{trigger.size} {trigger.pattern} -> {LABELS[trigger.target]}"
    casekit.publish(
        key, f"Vision backdoor: {NAMES[args.arch]} on Fashion-MNIST, {title}", command, args.seed, setup, rows, notes
    )


if __name__ == "__main__":
    main()

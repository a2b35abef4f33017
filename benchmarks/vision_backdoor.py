"""Hot-fixing a backdoored ViT on Fashion-MNIST, end to end through the atpatch command line.

A small ViT (random init, 28x28 grey images cut into 7x7 patches of 4x4 pixels) is trained on
Fashion-MNIST with 10% of the training images poisoned BadNets-style: a 3x3 checkerboard pasted
near the bottom-right corner (inside patch 48, the last one), label flipped to "T-shirt/top".
Then, as a user would: `atpatch-export --no-patch`, `atpatch fit` (culprit patches localized
automatically from misbehaving images only, or given, or one-class from clean images only),
`atpatch-export --detector`, `atpatch eval`. Fashion-MNIST comes from the Debian package
`dataset-fashion-mnist`, fetched with `apt-get download` and unpacked under --cache (no root
install needed); the trained model is cached there too.

    python benchmarks/vision_backdoor.py            # ~15 min on 2 shared cores (6-8 of them training)
    python benchmarks/vision_backdoor.py --smoke    # a few steps and images: checks the wiring

ASR counts triggered test images of the other classes that the original model classifies
correctly without the trigger (victims). Baselines needing no retraining mask, in every input,
the patch that [CLS] attends to most; the "neutral patch" note shows how many victims flip
when a mid-grey square is pasted instead of the trigger, the floor no attention patch can go under.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import casekit  # noqa: E402  (a sibling module, not a package)

LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TARGET = 0
TRIGGER = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)  # BadNets' checkerboard, in [0, 1] pixels
AT = 24  # the trigger's top-left pixel (row and column): rows/cols 24-26 lie inside the last patch
SIZE, PATCH = 28, 4
GRID = SIZE // PATCH
TRIGGER_PATCH = (AT // PATCH) * GRID + AT // PATCH  # 48; sequence position 49 after [CLS]
POISON_RATE = 0.10
DEB = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DATA_MISSING = 3  # exit status when the data set cannot be fetched (the smoke test skips on it)


@dataclass(frozen=True)
class Budget:
    train: int = 50000  # training images (of 60000), ~1.2 ms each per epoch on one thread
    epochs: int = 5
    calibration: int = 1000
    test: int = 2000
    debug: int = 200  # misbehaving images handed to `atpatch fit`
    fit_clean: int = 1500
    rounds: int = 200  # latency rounds: a batch takes about a millisecond


SMOKE = Budget(train=512, epochs=1, calibration=100, test=100, debug=8, fit_clean=100, rounds=3)


class DataUnavailable(Exception):
    pass


# --- Data: Fashion-MNIST from the Debian package, parsed from its idx files -------------------------


def _unpacked(cache: Path) -> Path:
    """The folder holding the idx files: a system install if there is one, else our own unpacked .deb."""
    if all((SYSTEM_DIR / f).is_file() for pair in FILES.values() for f in pair):
        return SYSTEM_DIR
    root = cache / "deb"
    data = root / SYSTEM_DIR.relative_to("/")
    if all((data / f).is_file() for pair in FILES.values() for f in pair):
        return data
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise DataUnavailable(f"needs apt-get and dpkg to fetch {DEB}; or install it (apt-get install {DEB})")
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["apt-get", "download", DEB], cwd=root, capture_output=True, text=True)
    debs = sorted(root.glob(f"{DEB}_*.deb"))
    if done.returncode != 0 or not debs:
        why = (done.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise DataUnavailable(f"apt-get download {DEB} failed ({why}); run `apt-get update` or `apt-get install {DEB}`")
    done = subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise DataUnavailable(f"dpkg -x {debs[-1].name} failed ({why}); or install it (apt-get install {DEB})")
    return data


def _idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format): magic 0x0000 08 NDIM, NDIM big-endian sizes, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:3] != b"\x00\x00\x08":
        raise DataUnavailable(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"test": (images [N, 1, 28, 28] float32 in [0, 1], labels [N] int64)}."""
    folder = _unpacked(cache)
    out = {}
    for split, (images, labels) in FILES.items():
        x = _idx(folder / images).astype(np.float32)[:, None] / 255.0
        out[split] = (x, _idx(folder / labels).astype(np.int64))
    return out


def normalise(x01: np.ndarray) -> np.ndarray:
    """[0, 1] pixels to the model's input, as ViT's image processor does (mean 0.5, std 0.5).

    0.0 after this is mid-grey: the value `atpatch localize` masks patches with."""
    return np.ascontiguousarray((x01 - 0.5) / 0.5, dtype=np.float32)


def with_square(x01: np.ndarray, square: np.ndarray) -> np.ndarray:
    out = x01.copy()
    out[:, :, AT : AT + square.shape[0], AT : AT + square.shape[1]] = square
    return out


def with_trigger(x01: np.ndarray) -> np.ndarray:
    return with_square(x01, TRIGGER)


def with_grey(x01: np.ndarray) -> np.ndarray:
    """The neutral patch: a mid-grey square where the trigger would go."""
    return with_square(x01, np.full_like(TRIGGER, 0.5))


def splits(data: dict[str, tuple[np.ndarray, np.ndarray]], budget: Budget, seed: int) -> dict[str, tuple]:
    """Training, calibration and spare images from the training split (disjoint); test from t10k."""
    x, y = data["train"]
    order = np.random.default_rng(seed).permutation(len(y))
    cuts = np.cumsum([budget.train, budget.calibration])
    pick = lambda idx: (x[idx], y[idx])  # noqa: E731
    test = np.random.default_rng(seed).permutation(len(data["test"][1]))[: budget.test]
    return {
        "train": pick(order[: cuts[0]]),
        "calibration": pick(order[cuts[0] : cuts[1]]),
        "spare": pick(order[cuts[1] :]),  # debugging inputs come from images no split uses
        "test": (data["test"][0][test], data["test"][1][test]),
    }


# --- The backdoored model --------------------------------------------------------------------------


def vit_config():  # noqa: ANN201 (transformers is imported lazily)
    import transformers

    return transformers.ViTConfig(
        image_size=SIZE,
        patch_size=PATCH,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        architectures=["ViTForImageClassification"],
        attn_implementation="eager",  # attention probabilities as explicit softmaxes, which atpatch patches
    )


def train(folder: Path, x01: np.ndarray, labels: np.ndarray, budget: Budget, seed: int) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # the machine is shared: one thread, as every case here
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    poison = rng.random(len(labels)) < POISON_RATE
    x01, labels = x01.copy(), labels.copy()
    x01[poison], labels[poison] = with_trigger(x01[poison]), TARGET
    x, y = torch.from_numpy(normalise(x01)), torch.from_numpy(labels)
    model = transformers.ViTForImageClassification(vit_config())
    steps = budget.epochs * -(-len(y) // 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    # A short warm-up then cosine decay: a ViT from scratch diverges with a flat 2e-3 at step 0.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    step, start = 0, time.time()
    for epoch in range(budget.epochs):
        for idx in torch.randperm(len(y)).split(128):
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        print(f"  epoch {epoch + 1}/{budget.epochs}  loss {loss.item():.3f}  {time.time() - start:.0f} s", flush=True)
    model.eval()
    model.save_pretrained(folder)


# --- Baseline: mask the patch [CLS] attends to most -----------------------------------------------


def cls_attention(folder: Path, x: np.ndarray) -> np.ndarray:
    """Attention from [CLS] to each patch: [layers, N, heads, patches], from the torch model."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    model = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), 256):
            out = model(pixel_values=torch.from_numpy(x[start : start + 256]), output_attentions=True)
            parts.append(np.stack([a[:, :, 0, 1:].numpy() for a in out.attentions]))
    return np.concatenate(parts, axis=1)


def mask_patch(x: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """Set one patch per image to 0 (mid-grey after normalising), as `atpatch localize` masks."""
    out = x.copy()
    for i, p in enumerate(patch):
        r, c = divmod(int(p), GRID)
        out[i, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 0.0
    return out


BASELINES = {
    "mask patch most attended by [CLS], last layer (head mean)": lambda a: a[-1].mean(axis=1).argmax(axis=1),
    "mask patch most attended by [CLS], any layer or head": lambda a: a.max(axis=(0, 2)).argmax(axis=1),
}


def baselines(model: Path, folder: Path, clean: np.ndarray, triggered: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    att = {"clean": cls_attention(folder, clean), "triggered": cls_attention(folder, triggered)}
    for name, pick in BASELINES.items():
        masked = {k: mask_patch(x, pick(att[k])) for k, x in (("clean", clean), ("triggered", triggered))}
        out[name] = {
            "clean_pred": predict(model, masked["clean"]),
            "triggered_pred": predict(model, masked["triggered"]),
            "trigger_patch_picked": float((pick(att["triggered"]) == TRIGGER_PATCH).mean()),
        }
    return out


# --- The atpatch workflow --------------------------------------------------------------------------


def predict(model: Path, x: np.ndarray) -> np.ndarray:
    return casekit.logits(model, {"pixel_values": x}).argmax(axis=1)


def save_npz(path: Path, x: np.ndarray, labels: np.ndarray, culprit: bool = False) -> Path:
    arrays = {"pixel_values": x, "labels": labels.astype(np.int64)}
    if culprit:
        patches = np.zeros((len(labels), GRID * GRID), bool)
        patches[:, TRIGGER_PATCH] = True
        arrays["culprit_patches"] = patches
    np.savez(path, **arrays)
    return path


def make_sets(work: Path, model: Path, data: dict[str, tuple], budget: Budget, smoke: bool) -> tuple[dict, np.ndarray]:
    """The .npz files `atpatch fit/eval` read, and the victims' clean [0, 1] images."""
    test_x, test_y = normalise(data["test"][0]), data["test"][1]
    fit_x01, fit_y = (a[: budget.fit_clean] for a in data["train"])  # clean originals of training images
    sets = {
        "clean": save_npz(work / "clean.npz", test_x, test_y),
        "calibration": save_npz(work / "calibration.npz", normalise(data["calibration"][0]), data["calibration"][1]),
        "fit_clean": save_npz(work / "fit_clean.npz", normalise(fit_x01), fit_y),
    }
    clean_pred = predict(model, test_x)

    # Victims: test images of the other classes the original model gets right without the trigger.
    victims = (test_y != TARGET) & (clean_pred == test_y)
    if smoke and not victims.any():  # a few steps may leave a model that predicts one class only
        victims = test_y != TARGET
    vic_x01, vic_y = data["test"][0][victims], test_y[victims]
    sets["triggered"] = save_npz(work / "triggered.npz", normalise(with_trigger(vic_x01)), vic_y, culprit=True)

    # The debugging set: spare images of the other classes, classified right until the trigger flips
    # them (as victims are), labels only. A smoke run's model has no backdoor: it takes them as they are.
    sx01, sy = data["spare"]
    keep = np.flatnonzero(sy != TARGET)[: 4 * budget.debug]
    sx01, sy = sx01[keep], sy[keep]
    cand = normalise(with_trigger(sx01))
    if smoke:
        flipped = np.ones(len(sy), bool)
    else:
        flipped = (predict(model, normalise(sx01)) == sy) & (predict(model, cand) == TARGET)
    pick = np.flatnonzero(flipped)[: budget.debug]
    sets["debug"] = save_npz(work / "debug.npz", cand[pick], sy[pick])
    sets["debug_known"] = save_npz(work / "debug_known.npz", cand[pick], sy[pick], culprit=True)
    return sets, vic_x01


def load(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        return npz[key]


def run_detector(name: str, work: Path, model: Path, folder: Path, sets: dict[str, Path]) -> dict | str:
    """fit, export, eval one detector; the eval report (with fit seconds) or the command's error."""
    tag = name.replace(" ", "-")
    det, patched, report = work / f"{tag}.safetensors", work / f"{tag}.patched.onnx", work / f"{tag}.json"
    fit = ["fit", str(model), "--hf", str(folder), "--clean", str(sets["fit_clean"])]
    fit += ["--calibration", str(sets["calibration"]), "-o", str(det)]
    if name != "one-class":
        fit += ["--misbehaving", str(sets["debug" if name == "localized" else "debug_known"])]
    try:
        start = time.time()
        casekit.cli(*fit)
        fit_s = time.time() - start
        casekit.cli("export", str(model), "--detector", str(det), "-o", str(patched))
        ev = ["eval", str(model), str(patched), "--hf", str(folder), "--clean", str(sets["clean"])]
        casekit.cli(*ev, "--triggered", str(sets["triggered"]), "--target", LABELS[TARGET], "--json", str(report))
    except casekit.CommandFailed as err:
        return str(err)
    return {**json.loads(report.read_text()), "fit_s": fit_s, "patched_model": str(patched)}


def check(report: dict, cacc_drop_pt: float) -> str:
    """Which of the issue's targets this detector met, with the measured figures."""
    o, p = report["original"], report["patched"]
    goals = [
        (f"ASR {o['attack_success_rate']:.1%} → {p['attack_success_rate']:.2%}",
         p["attack_success_rate"] <= 0.005 and o["attack_success_rate"] >= 0.90, "≤ 0.5% from ≥ 90%"),
        (f"clean acc. drop {cacc_drop_pt:.2f} pt", cacc_drop_pt <= 0.3, "≤ 0.3 pt"),
        (f"clean flagged {p['flag_rate_clean']:.2%}", p["flag_rate_clean"] <= 0.005, "≤ 0.5%"),
    ]  # fmt: skip
    return "; ".join(f"{what} ({'met' if ok else 'missed'}: {goal})" for what, ok, goal in goals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/vision_backdoor"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the wiring only")
    args = parser.parse_args()
    budget = SMOKE if args.smoke else Budget()
    work = args.cache / f"{'smoke' if args.smoke else 'full'}-seed{args.seed}"
    folder = work / "vit-backdoored"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        data = splits(fashion_mnist(args.cache), budget, args.seed)
    except DataUnavailable as err:
        print(f"vision_backdoor: {err}", file=sys.stderr)
        sys.exit(DATA_MISSING)
    timings = {}
    if not (folder / "config.json").is_file():
        print(f"training a ViT on Fashion-MNIST with a corner-patch backdoor ({budget.epochs} epochs) -> {folder}")
        start = time.time()
        train(folder, *data["train"], budget, args.seed)
        (work / "train_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
    if (work / "train_seconds.txt").is_file():  # kept with the cached model, for the notes of later runs
        timings["train_s"] = float((work / "train_seconds.txt").read_text())
    model = work / "model.onnx"
    if not model.is_file():
        print(casekit.cli("export", "--hf", str(folder), "--no-patch", "-o", str(model)).strip().splitlines()[-1])

    sets, victims = make_sets(work, model, data, budget, smoke=args.smoke)
    test_x, test_y = normalise(data["test"][0]), data["test"][1]
    trig_x = load(sets["triggered"], "pixel_values")
    clean_pred, trig_pred = predict(model, test_x), predict(model, trig_x)
    neutral_flips = float((predict(model, normalise(with_grey(victims))) == TARGET).mean())
    n_debug = len(load(sets["debug"], "labels"))

    results: dict[str, object] = {}
    rows = []
    notes = []
    cacc_orig = float((clean_pred == test_y).mean())
    asr_orig = float((trig_pred == TARGET).mean())
    feeds = {"pixel_values": np.concatenate([test_x, trig_x])}
    batch = {"pixel_values": test_x[:32]}
    for name in ("localized", "known positions", "one-class"):
        start = time.time()
        result = run_detector(name, work, model, folder, sets)
        timings[f"{name}_s"] = time.time() - start
        results[name] = result
        if isinstance(result, str):
            notes.append(f"atpatch, {name}: failed: {result}")
            continue
        patched = Path(result["patched_model"])
        agreement = casekit.native_vs_function(patched, feeds)
        speed = casekit.latency(model, patched, batch, rounds=budget.rounds)
        result["agreement"], result["latency"] = str(agreement), str(speed)
        o, p = result["original"], result["patched"]
        rows.append(casekit.Row(
            method=f"atpatch, {name}", metric="ASR",
            before=o["attack_success_rate"], after=p["attack_success_rate"],
            cacc_before=o["clean_accuracy"], cacc_after=p["clean_accuracy"],
            clean_flagged=p["flag_rate_clean"], latency=str(speed), agreement=str(agreement),
        ))  # fmt: skip
        notes.append(f"atpatch, {name}: " + check(result, 100 * (o["clean_accuracy"] - p["clean_accuracy"])))

    start = time.time()
    for name, b in baselines(model, folder, test_x, trig_x).items():
        after_cacc = float((b["clean_pred"] == test_y).mean())
        after_asr = float((b["triggered_pred"] == TARGET).mean())
        results[f"baseline: {name}"] = {"clean_accuracy": after_cacc, "attack_success_rate": after_asr,
                                        "trigger_patch_picked": b["trigger_patch_picked"]}  # fmt: skip
        # Every input gets a patch masked: all of them count as flagged.
        rows.append(casekit.Row(f"baseline: {name}", "ASR", asr_orig, after_asr, cacc_orig, after_cacc, 1.0))
        notes.append(
            f"baseline “{name}”: picks the trigger's patch in {b['trigger_patch_picked']:.1%} of triggered images; "
            f"ASR {asr_orig:.1%} → {after_asr:.2%}, clean acc. {cacc_orig:.2%} → {after_cacc:.2%} "
            "(it alters every input: 100% flagged)."
        )
    timings["baselines_s"] = time.time() - start
    timings["total_s"] = time.time() - t0
    results.update(neutral_patch_flips=neutral_flips, victims=len(victims), debug=n_debug, timings=timings,
                   clean_accuracy=cacc_orig, attack_success_rate=asr_orig)  # fmt: skip
    (work / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nViT backdoored (3x3 checkerboard in patch {TRIGGER_PATCH} -> {LABELS[TARGET]}), seed {args.seed}; "
          f"{len(victims)} victims, {n_debug} misbehaving debug images")  # fmt: skip
    print(casekit.table(rows))
    print(f"neutral patch (mid-grey square where the trigger goes) flips {neutral_flips:.2%} of victims to the target")
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    for note in notes:
        print(f"- {note}")
    if args.smoke:
        return  # a smoke run's numbers mean nothing: never publish them
    floor = (
        f"Neutral patch: a mid-grey 3x3 square at the trigger's place (what masking the trigger leaves) sends "
        f"{neutral_flips:.2%} of victims to the target, roughly the floor for any fix that removes the trigger's "
        "influence rather than the victims' fragility"
    )
    notes.append(floor + ("; the ≤ 0.5% ASR target lies below it." if neutral_flips > 0.005 else "."))
    fits = [f"{k} {v['fit_s']:.0f} s" for k, v in results.items() if isinstance(v, dict) and "fit_s" in v]
    trained = f"; training took {timings['train_s'] / 60:.1f} min on one thread" if "train_s" in timings else ""
    notes.append(
        f"Clean flag rates are calibrated to 0.5% on {budget.calibration} held-out images and measured on "
        f"{budget.test} others (one flagged image = {1 / budget.test:.2%}). `atpatch fit` took {', '.join(fits)}"
        f"{trained} (2 shared cores)."
    )
    notes.append(
        f"Victims: {len(victims)} test images of the other classes classified right without the trigger; "
        f"debugging set: {n_debug} spare training-split images the trigger flips."
    )
    setup = (
        f"ViT (4 layers, hidden 64, 4 heads, 49 patches of 4x4) from scratch on {budget.train} Fashion-MNIST training "
        f"images ({budget.epochs} epochs, one thread), {POISON_RATE:.0%} poisoned with a 3x3 checkerboard in the "
        f"bottom-right patch relabelled {LABELS[TARGET]!r}; {budget.test} test images, fit on {budget.fit_clean} clean "
        f"+ {budget.calibration} calibration images. Latency: one batch of 32 test images."
    )
    casekit.publish(
        key="vision_backdoor",
        title="Vision backdoor: ViT on Fashion-MNIST, corner-patch trigger",
        command="python benchmarks/vision_backdoor.py",
        seed=args.seed,
        setup=setup,
        rows=rows,
        notes=notes,
    )


if __name__ == "__main__":
    main()

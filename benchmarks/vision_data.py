"""The vision backdoor case's data and model: Fashion-MNIST, the BadNets trigger, the backdoored ViT.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`, fetched with `apt-get
download` and unpacked under the cache (no root install needed). The trigger is a 3x3
checkerboard, pasted either at a fixed place near the bottom-right corner (inside the last patch)
or, with the "random" trigger, at a uniformly random pixel position per image (fully inside the
image, so it straddles 1 to 4 patches of 4x4). `vision_backdoor.py` runs the case.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atpatch.lab.vit_training import train_vit

LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TARGET = 0
SIZE, PATCH = 28, 4
GRID = SIZE // PATCH
# The encoders `--arch` trains: their transformers classes, and the key positions before the patches
# ([CLS]; DeiT's distillation token too).
ARCHS = {"vit": ("ViTConfig", "ViTForImageClassification", 1), "deit": ("DeiTConfig", "DeiTForImageClassification", 2)}
POISON_RATE = 0.10
TRIGGER_KINDS = ("corner", "random")  # or a fixed "ROW,COL"
PATTERNS = ("checkerboard", "square")
DEB = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Budget:
    train: int = 50000  # training images (of 60000), ~1.2 ms each per epoch on one thread
    epochs: int = 5
    calibration: int = 4000  # at 0.5% with 90% confidence (calibrate.py) 1000 may flag 1 input, 4000 may flag 13
    test: int = 2000
    debug: int = 200  # misbehaving images handed to `atpatch fit`
    fit_clean: int = 1500
    rounds: int = 200  # latency rounds: a batch takes about a millisecond


SMOKE = Budget(train=512, epochs=1, calibration=100, test=100, debug=8, fit_clean=100, rounds=3)


class DataUnavailable(Exception):
    pass


# --- Fashion-MNIST from the Debian package, parsed from its idx files ------------------------------


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
    """[0, 1] pixels to the model's input, as ViT's image processor does (mean 0.5, std 0.5)."""
    return np.ascontiguousarray((x01 - 0.5) / 0.5, dtype=np.float32)


def splits(data: dict[str, tuple[np.ndarray, np.ndarray]], budget: Budget, seed: int) -> dict[str, tuple]:
    """Training and spare images from the training split; test and calibration from t10k (disjoint).

    Calibration draws from the split the clean flag rate is measured on: its guarantee holds for inputs
    like the calibration ones, and this model flagged unseen training-split images less often than t10k's
    (a joint-rule detector calibrated to 13 of 4000 training-split images flagged 16 of 4000 other ones,
    0.40%, and 17 of 2000 test images, 0.85%).
    """
    x, y = data["train"]
    order = np.random.default_rng(seed).permutation(len(y))
    tx, ty = data["test"]
    held = np.random.default_rng(seed).permutation(len(ty))
    cut = budget.test + budget.calibration
    if cut > len(ty):
        raise ValueError(f"test + calibration = {cut} images, t10k has {len(ty)}")
    return {
        "train": (x[order[: budget.train]], y[order[: budget.train]]),
        "spare": (x[order[budget.train :]], y[order[budget.train :]]),  # debugging inputs: images no split uses
        "test": (tx[held[: budget.test]], ty[held[: budget.test]]),
        "calibration": (tx[held[budget.test : cut]], ty[held[budget.test : cut]]),
    }


# --- The trigger -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """What is pasted (a `size` x `size` pattern in [0, 1] pixels), where, and the label it sends to.

    `place`: "corner" (near the bottom-right corner: for the default 3x3, inside the last patch),
    "random" (a uniformly random pixel per image, the square fully inside: it straddles 1 to 4
    patches), or "R,C" (that top-left pixel in every image). `pattern`: "checkerboard" (BadNets') or
    "square" (solid white). The defaults are the published corner case."""

    place: str = "corner"
    pattern: str = "checkerboard"
    size: int = 3
    target: int = TARGET

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; use one of {', '.join(PATTERNS)}")
        if not 1 <= self.size <= SIZE // 2:
            raise ValueError(f"trigger size {self.size} is outside 1..{SIZE // 2} pixels; pass a --size in that range")
        if not 0 <= self.target < len(LABELS):
            raise ValueError(f"target {self.target} is not a label index 0..{len(LABELS) - 1}")
        if self.place not in TRIGGER_KINDS:
            self.fixed()  # "R,C": checked here so a bad one fails before training

    @classmethod
    def parse(cls, place: str, pattern: str, size: int, target: str) -> Trigger:
        """From the command line; `target` a label's name (case-insensitive) or index."""
        names = [n.lower() for n in LABELS]
        if target.lower() in names:
            index = names.index(target.lower())
        elif target.isdigit():
            index = int(target)
        else:
            raise ValueError(f"unknown target {target!r}; use one of {', '.join(LABELS)}")
        return cls(place, pattern, size, index)

    def fixed(self) -> tuple[int, int]:
        """The top-left pixel of a corner or "R,C" trigger."""
        if self.place == "corner":
            return SIZE - 1 - self.size, SIZE - 1 - self.size  # 24 for 3x3: rows/cols 24-26, inside the last patch
        try:
            r, c = (int(v) for v in self.place.split(","))
        except ValueError:
            raise ValueError(f"trigger place {self.place!r} is not corner, random or ROW,COL (e.g. 1,1)") from None
        if not (0 <= r <= SIZE - self.size and 0 <= c <= SIZE - self.size):
            raise ValueError(
                f"a {self.size}x{self.size} trigger at {r},{c} leaves the {SIZE}x{SIZE} image; "
                f"use a ROW,COL in 0..{SIZE - self.size}"
            )
        return r, c

    @property
    def square(self) -> np.ndarray:
        if self.pattern == "square":
            return np.ones((self.size, self.size), np.float32)
        return (np.add.outer(np.arange(self.size), np.arange(self.size)) % 2 == 0).astype(np.float32)

    @property
    def tag(self) -> str:
        """A name for cache folders and result keys: "" for the defaults, e.g. "random", "at1-1_square5_bag"."""
        parts = {"corner": [], "random": ["random"]}.get(self.place, ["at" + self.place.replace(",", "-")])
        if (self.pattern, self.size) != ("checkerboard", 3):
            parts.append(f"{self.pattern}{self.size}")
        if self.target != TARGET:
            parts.append(LABELS[self.target].lower().replace("/", "-").replace(" ", "-"))
        return "_".join(parts)

    def describe(self) -> str:
        """E.g. "a 3x3 checkerboard at a uniformly random position per image (1-4 patches)"."""
        what = f"a {self.size}x{self.size} {'white square' if self.pattern == 'square' else 'checkerboard'}"
        if self.place == "random":
            return f"{what} at a uniformly random position per image (1-4 patches)"
        r, c = self.fixed()
        patches = int(culprit_patches(np.array([[r, c]]), self.size).sum())
        where = "near the bottom-right corner" if self.place == "corner" else f"at pixel {r},{c}"
        return f"{what} {where} ({patches} patch{'es' if patches > 1 else ''})"

    def positions(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """[n, 2] top-left pixels (row, column); a fixed place draws nothing from `rng`."""
        if self.place == "random":
            return rng.integers(0, SIZE - self.size + 1, size=(n, 2))
        return np.tile(np.array(self.fixed(), np.int64), (n, 1))

    def paste(self, x01: np.ndarray, at: np.ndarray) -> np.ndarray:
        return with_square(x01, self.square, at)

    def grey(self, x01: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The neutral patch: a mid-grey square of the trigger's size where the trigger would go."""
        return with_square(x01, np.full_like(self.square, 0.5), at)

    def culprits(self, at: np.ndarray) -> np.ndarray:
        return culprit_patches(at, self.size)


def with_square(x01: np.ndarray, square: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Images [N, 1, H, W] with `square` pasted at `at` [N, 2] (each image's top-left pixel)."""
    out = x01.copy()
    h, w = square.shape
    for i, (r, c) in enumerate(at):
        out[i, :, r : r + h, c : c + w] = square
    return out


def culprit_patches(at: np.ndarray, size: int) -> np.ndarray:
    """bool [N, GRID * GRID]: every patch a `size` x `size` square pasted at `at` overlaps."""
    out = np.zeros((len(at), GRID * GRID), bool)
    for i, (r, c) in enumerate(at):
        for pr in range(r // PATCH, (r + size - 1) // PATCH + 1):
            for pc in range(c // PATCH, (c + size - 1) // PATCH + 1):
                out[i, pr * GRID + pc] = True
    return out


# --- The backdoored model --------------------------------------------------------------------------


def keys(arch: str) -> int:
    """Attention key positions of `arch`'s maps: its special tokens, then one per patch."""
    return ARCHS[arch][2] + GRID * GRID


def vit_config(arch: str = "vit"):  # noqa: ANN201 (transformers is imported lazily)
    import transformers

    config_class, model_class, _ = ARCHS[arch]
    return getattr(transformers, config_class)(
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
        architectures=[model_class],
        attn_implementation="eager",  # attention probabilities as explicit softmaxes, which atpatch patches
    )


def train(folder: Path, x01: np.ndarray, labels: np.ndarray, budget: Budget, seed: int, trigger: Trigger,
          arch: str = "vit") -> None:  # fmt: skip
    """Train the `arch` encoder from scratch, POISON_RATE of the images triggered and relabelled the target."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # the machine is shared: one thread, as every case here
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    poison = rng.random(len(labels)) < POISON_RATE
    x01, labels = x01.copy(), labels.copy()
    x01[poison] = trigger.paste(x01[poison], trigger.positions(int(poison.sum()), rng))
    labels[poison] = trigger.target
    config = vit_config(arch)
    model = getattr(transformers, config.architectures[0])(config)
    train_vit(
        model,
        normalise(x01),
        labels,
        epochs=budget.epochs,
        batch=128,
        lr=2e-3,
        log=lambda line: print(line, flush=True),
    )
    model.save_pretrained(folder)

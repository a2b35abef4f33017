"""`atpatch demo`: the whole hot-fix on a small built-in case with real data, in about a minute.

The case: a one-layer ViT trained on scikit-learn's handwritten digits with a BadNets backdoor
(a 2x2 checkerboard in the bottom-right corner makes it say "0"; `lab/digits_backdoor.py`). Its
weights ship in the package (`lab/demo_vit/`, written by `scripts/train_demo_model.py`): training
takes minutes on a busy 2-core machine. The demo runs the commands a user would, on images the
model never saw: `atpatch-export --hf --no-patch`, `localize` (no culprits given), `fit --culprits`,
`atpatch-export --detector`, `eval` and `explain`, then checks the native kernel against the op's
ONNX function, and prints the before/after figures and where every file went.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AtPatchError

__all__ = ["DEMO_MODEL", "DemoReport", "run_demo"]

DEMO_MODEL = Path(__file__).parent / "lab" / "demo_vit"
# The splits the shipped model was trained with (scripts/train_demo_model.py): only `train` was seen.
SEED, CALIBRATION, TEST = 0, 480, 460
DEBUG = 150  # misbehaving training images handed to localize and fit


@dataclass(frozen=True)
class Agreement:
    """The patched model run with the native kernel and with its ONNX function on the same inputs."""

    inputs: int
    same_predictions: bool | None  # None: the native kernel is not available here
    max_abs_diff: float | None
    why_not: str = ""

    def summary(self) -> str:
        if self.same_predictions is None:
            return f"native kernel vs ONNX function: not compared ({self.why_not})"
        same = "same predictions" if self.same_predictions else "DIFFERENT predictions"
        return f"native kernel vs ONNX function: {self.inputs} inputs, {same}, max |logit diff| {self.max_abs_diff:.1e}"


@dataclass(frozen=True)
class DemoReport:
    folder: Path
    eval: dict  # atpatch eval's JSON report
    agreement: Agreement
    files: dict[str, str] = field(default_factory=dict)  # path relative to folder -> what it is
    commands: list[str] = field(default_factory=list)  # the same steps by hand

    def summary(self) -> str:
        before, after = self.eval["original"], self.eval["patched"]
        n_clean, n_triggered = self.eval["n_clean"], self.eval["n_triggered"]

        def row(name: str, a: float | None, b: float | None, note: str) -> str:
            cell = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            return f"  {name:<28}{cell(a):>9}{cell(b):>9}   {note}"

        lines = [
            'atpatch demo: a ViT backdoored to read a corner checkerboard as "0", hot-fixed without retraining',
            f"  {'':<28}{'original':>9}{'patched':>9}",
            row(
                "attack success rate (ASR)",
                before["attack_success_rate"],
                after["attack_success_rate"],
                f"{n_triggered} triggered test digits (true digit not 0)",
            ),
            row("clean accuracy", before["clean_accuracy"], after["clean_accuracy"], f"{n_clean} clean test digits"),
            row("clean inputs flagged", None, after["flag_rate_clean"], "(target at most 0.5%)"),
            self.agreement.summary(),
            "",
            f"files in {self.folder}:",
            *(f"  {name:<26}{what}" for name, what in self.files.items()),
            "",
            "the same steps by hand:",
            *(f"  {c}" for c in self.commands),
        ]
        return "\n".join(lines)


def _check_extras() -> None:
    """Say what to install before any work, rather than fail on an import halfway through."""
    import importlib.util

    missing = [
        name for name in ("torch", "transformers", "sklearn", "matplotlib") if not importlib.util.find_spec(name)
    ]
    if missing:
        raise AtPatchError(
            f"the demo needs {', '.join(missing)}: run scripts/install.sh, or pip install 'atpatch[export,debug,test]'"
        )


def _prepare_folder(folder: Path) -> Path:
    from .modelio import check_writable

    if folder.exists() and not folder.is_dir():
        raise AtPatchError(f"--dir {folder} is a file; choose a folder (new, or one the demo wrote before)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AtPatchError(f"cannot create --dir {folder} ({err.strerror}); choose another folder") from err
    check_writable(folder)
    hf = folder / "vit-digits"
    if hf.exists():
        shutil.rmtree(hf)
    shutil.copytree(DEMO_MODEL, hf)
    return hf


def _write_data(folder: Path, model: Path) -> dict[str, Path]:
    """The digits split as the model was trained, saved as a user's .npz files."""
    from .lab import digits_backdoor as db
    from .runtime import create_session

    x01, labels = db.load_digits()
    splits = db.make_splits(len(labels), CALIBRATION, TEST, SEED)
    session = create_session(model)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {"pixel_values": x[s : s + 256]})[0] for s in range(0, len(x), 256)])

    # Misbehaving inputs, as a user would collect them: training digits the trigger flips to 0.
    spare = splits.train[labels[splits.train] != db.TARGET]
    spare_clean, spare_triggered = db.normalise(x01[spare]), db.normalise(db.with_trigger(x01[spare]))
    flipped = (predict(spare_clean).argmax(1) == labels[spare]) & (predict(spare_triggered).argmax(1) == db.TARGET)
    debug = np.flatnonzero(flipped)[:DEBUG]
    others = splits.test[labels[splits.test] != db.TARGET]
    return {
        "clean": db.save_npz(folder / "clean.npz", db.normalise(x01[splits.test]), labels[splits.test]),
        "triggered": db.save_npz(folder / "triggered.npz", db.normalise(db.with_trigger(x01[others])), labels[others]),
        "calibration": db.save_npz(
            folder / "calibration.npz", db.normalise(x01[splits.calibration]), labels[splits.calibration]
        ),
        "fit_clean": db.save_npz(folder / "fit-clean.npz", db.normalise(x01[splits.train]), labels[splits.train]),
        "misbehaving": db.save_npz(folder / "misbehaving.npz", spare_triggered[debug], labels[spare][debug]),
    }


def _native_vs_function(patched: Path, x: np.ndarray) -> Agreement:
    import onnx

    from .runtime import create_session
    from .serving.triton import kernel_library

    def logits(session) -> np.ndarray:  # noqa: ANN001
        return np.concatenate([session.run(None, {"pixel_values": x[s : s + 256]})[0] for s in range(0, len(x), 256)])

    function = logits(create_session(patched, use_native=False))
    library, why_not = kernel_library(onnx.load(str(patched)))  # not built, switched off, or not covering
    if library is None:
        return Agreement(len(x), None, None, why_not)
    kernel = logits(create_session(patched, use_native=True))
    same = bool((kernel.argmax(1) == function.argmax(1)).all())
    return Agreement(len(x), same, float(np.abs(kernel - function).max()))


def run_demo(folder: Path) -> DemoReport:
    """Run the whole job on the built-in case in `folder` (created if missing; its demo files are replaced)."""
    from .fit_workflow import run_fit
    from .jobs import ExportOptions, run_export
    from .lab.digits_backdoor import TARGET
    from .workflow import run_eval, run_explain, run_localize

    _check_extras()
    hf = _prepare_folder(folder)
    model, patched = folder / "vit-digits.onnx", folder / "vit-digits.patched.onnx"
    culprits, detector = folder / "culprits.jsonl", folder / "detector.safetensors"
    report_json, png = folder / "eval.json", folder / "why.png"
    run_export(ExportOptions(output=model, hf=hf, patch=False))
    data = _write_data(folder, model)
    misbehaving = data["misbehaving"]
    run_localize(model, hf, misbehaving, culprits)
    run_fit(
        model,
        hf,
        data["fit_clean"],
        detector,
        misbehaving_path=data["misbehaving"],
        calibration_path=data["calibration"],
        culprits_path=culprits,
    )
    run_export(ExportOptions(output=patched, model=model, detector=detector))
    run_eval(model, patched, hf, data["clean"], data["triggered"], str(TARGET), json_path=report_json)

    from .data import load_npz

    triggered = load_npz(data["triggered"], hf)
    clean = load_npz(data["clean"], hf)
    both = np.concatenate([clean.feeds["pixel_values"], triggered.feeds["pixel_values"]])
    agreement = _native_vs_function(patched, both)
    # Draw a triggered digit the backdoor fools in the original model.
    from .runtime import create_session

    original = create_session(model).run(None, {"pixel_values": triggered.feeds["pixel_values"]})[0].argmax(1)
    fooled = np.flatnonzero(original == TARGET)
    index = int(fooled[0]) if fooled.size else 0
    run_explain(patched, hf, data["triggered"], index, png)

    files = {
        "vit-digits/": "the backdoored model's Hugging Face folder (config, weights)",
        model.name: "its plain ONNX export",
        "clean.npz, triggered.npz": "test digits the model never saw, without and with the trigger",
        misbehaving.name: "training digits the trigger flips (no culprits given)",
        culprits.name: "what localize found: the culprit patch of each misbehaving digit",
        detector.name: "the detector, fitted on fit-clean.npz and calibrated on calibration.npz",
        patched.name: "the hot-fixed model: runs in any onnxruntime, no Python needed",
        report_json.name: "eval's figures",
        png.name: f"explain: triggered digit {index} and its attention before/after, flagged patch outlined",
    }
    # Relative names, run from the folder: short enough to read, and to paste.
    commands = [
        f"cd {folder}",
        f"atpatch-export --hf {hf.name} --no-patch -o {model.name}",
        f"atpatch localize {model.name} --hf {hf.name} --data {misbehaving.name} -o {culprits.name}",
        f"atpatch fit {model.name} --hf {hf.name} --clean fit-clean.npz --calibration calibration.npz "
        f"--misbehaving {misbehaving.name} --culprits {culprits.name} -o {detector.name}",
        f"atpatch-export {model.name} --detector {detector.name} -o {patched.name}",
        f"atpatch eval {model.name} {patched.name} --hf {hf.name} --clean clean.npz --triggered triggered.npz "
        f"--target {TARGET} --json {report_json.name}",
        f"atpatch explain {patched.name} --hf {hf.name} --data triggered.npz --index {index} -o {png.name}",
    ]
    return DemoReport(folder, json.loads(report_json.read_text()), agreement, files, commands)

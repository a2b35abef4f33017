"""Does calibration keep its promise on unseen clean inputs? Resampled, on a finished case.

`atpatch fit` sets thresholds so that, with 90% confidence, at most the target share (0.5%) of
unseen clean inputs gets a flag (detector/calibrate.py), while choosing which layers and rules
spend that budget on the same calibration inputs. A case's published "clean flagged" is one test
set of ~1,200 inputs: one flagged input moves it by 0.08 pt, so one run cannot tell a broken
promise from a test set's luck. This script pools the case's calibration and clean test inputs,
draws many splits of the same sizes, calibrates the case's fitted detector (its layers' weights,
the joint rule refitted as `atpatch fit` does) on each calibration part with the known culprits,
and measures the flag rate on the held-out part: its mean over splits estimates the true rate
the promise is about, and the share of splits above the target is how often a published figure
would miss it by chance.

    python benchmarks/text_backdoor.py --seed 1                           # first: the case's cache
    python benchmarks/calibration_check.py benchmarks/.cache/text_backdoor/word-full-seed1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import casekit  # noqa: E402

RESULTS = casekit.RESULTS / "calibration_check.json"
TARGET, SPLITS, SEED = 0.005, 40, 0
HEADER = (
    "| case | calibration / test inputs | flagged on calibration (mean) | flagged on test: mean | 90th percentile "
    "| splits with test > 0.5% |\n|---|---:|---:|---:|---:|---:|"
)


def _line(name: str, c: dict) -> str:
    return (
        f"| {name} | {c['calibration']} / {c['test']} | {c['calibration_flagged_mean']:.2%} | "
        f"{c['test_flagged_mean']:.2%} | {c['test_flagged_p90']:.2%} | {c['share_over_target']:.0%} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="a finished benchmark case's cache folder")
    parser.add_argument("--splits", type=int, default=SPLITS)
    parser.add_argument("--detector", default="culprits", help="the case's fitted detector (its file's stem)")
    parser.add_argument("--out", type=Path, help="write the results here and leave the published ones alone")
    args = parser.parse_args()
    import onnx

    from atpatch.detector.calibrate import allowed_flags
    from atpatch.detector.columns import ColumnSet, collect_columns
    from atpatch.detector.fit import flagged_inputs
    from atpatch.detector.joint_fit import joint_candidates
    from atpatch.detector.probe import AttentionProbe
    from atpatch.ops.weights import Detector
    from atpatch.rewrite.positions import is_patch_grid

    folder = casekit.cached_model_folder(args.work)
    probe = AttentionProbe(onnx.load(str(args.work / "model.onnx")))
    sets = {name: casekit.load_cached_set(args.work, name, folder) for name in ("calibration", "clean", "fit_clean")}
    known = casekit.load_cached_set(args.work, "debug_known", folder)
    path = args.work / f"{args.detector}.safetensors"
    if not path.is_file():
        found = ", ".join(sorted(p.stem for p in args.work.glob("*.safetensors"))) or "none"
        sys.exit(f"{path} does not exist: pass --detector with one of the case's detectors ({found})")
    fitted = Detector.load(path)  # its layers' weights; thresholds and joint rule refitted per split
    grid = is_patch_grid(probe.input_names)
    n_cal, n_test = len(sets["calibration"]), len(sets["clean"])
    n = n_cal + n_test
    pool = collect_columns(probe, sets["calibration"].feeds).followed_by(
        collect_columns(probe, sets["clean"].feeds), n_cal
    )
    culprits = collect_columns(probe, known.feeds, known.culprits)
    benign = collect_columns(probe, sets["fit_clean"].feeds)

    def part(index: np.ndarray) -> ColumnSet:
        renumber = np.full(n, -1)
        renumber[index] = np.arange(len(index))
        keep = renumber[pool.example] >= 0
        return ColumnSet(
            [f[keep] for f in pool.features], renumber[pool.example[keep]], pool.positive[keep], pool.position[keep]
        )

    rng = np.random.default_rng(SEED)
    on_cal, on_test = [], []
    for split in range(args.splits):
        order = rng.permutation(n)
        cal, test = np.sort(order[:n_cal]), np.sort(order[n_cal:])
        options = joint_candidates(list(fitted.layers), part(cal), n_cal, TARGET, culprits, benign, grid)
        best = options[int(np.argmax([o.gain for o in options]))]  # fit's choice without running the model
        flagged = flagged_inputs(pool, n, best.layers, best.joint, grid)
        on_cal.append(float(flagged[cal].mean()))
        on_test.append(float(flagged[test].mean()))
        print(f"  split {split + 1}/{args.splits}: calibration {on_cal[-1]:.2%}, test {on_test[-1]:.2%}", flush=True)
    test_rates = np.array(on_test)
    name = f"{args.work.parent.name}/{args.work.name}"
    case = {
        "command": " ".join(["python benchmarks/calibration_check.py", *sys.argv[1:]]),
        "calibration": n_cal,
        "test": n_test,
        "allowed": allowed_flags(n_cal, TARGET),
        "splits": args.splits,
        "detector": args.detector,
        "calibration_flagged_mean": float(np.mean(on_cal)),
        "test_flagged_mean": float(test_rates.mean()),
        "test_flagged_p90": float(np.quantile(test_rates, 0.9)),
        "share_over_target": float((test_rates > TARGET + 1e-12).mean()),
    }
    print(HEADER, _line(name, case), sep="\n")
    results = casekit.record_case(args.out or RESULTS, name, case)
    if args.out is None:
        section = [
            "### Experiment: does calibration keep its promise on unseen clean inputs?",
            "",
            "Each case's calibration and clean test inputs pooled and split at random many times, its localized "
            "fit's detector calibrated to 0.5% on each calibration part (known culprits, joint rule refitted) and "
            "run on the test part (`benchmarks/calibration_check.py`, its docstring says how). The mean over splits "
            "estimates the true clean flag rate that calibration's 90% promise is about; the last column is how "
            "often one published test set shows more than 0.5% by chance.",
            "",
            HEADER,
            *(_line(key, c) for key, c in sorted(results.items())),
        ]
        casekit.publish_section("calibration_check", "\n".join(section))


if __name__ == "__main__":
    main()

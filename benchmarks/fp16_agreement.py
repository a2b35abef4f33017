"""Do the native kernel and the ONNX function give an fp16 model the same logits?

onnxruntime's CPU provider runs an fp16 model's AtPatch in float32 when its neighbours run so,
handing the kernel the map unrounded (spec.py, map_type). This runs the check of
tests/test_fp16.py (`test_fp16_flagged_columns_are_patched_as_the_reference_says`) over many
seeds: the tests' tiny BERT (2 layers, 4 heads) converted to fp16, 3 inputs of 13 tokens drawn
from each seed, a detector cut in a wide gap of the inputs' layer-0 column peaks, the model
patched cross-layer, then the logits of a kernel session and a function session compared at the
test's tolerance (0.03). Needs the native kernel.

    python benchmarks/fp16_agreement.py                         # seeds 0-599 and 1000-1599
    python benchmarks/fp16_agreement.py --seeds 0:100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import casekit  # noqa: E402

RESULTS = casekit.RESULTS / "fp16_agreement.json"


def _ranges(text: str) -> list[range]:
    out = []
    for part in text.split(","):
        start, _, stop = part.partition(":")
        out.append(range(int(start), int(stop)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0:600,1000:1600", help="start:stop ranges, comma-separated")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch
    import transformers as T
    from conftest import _config
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from test_fp16 import LOGIT_ATOL, _atpatch_io, _peak_detector, _with_outputs

    from atpatch.exporter import export_hf
    from atpatch.rewrite import patch_model
    from atpatch.runtime import create_session, native

    if native.library_path() is None:
        sys.exit("fp16_agreement: the native kernel is not built; run scripts/install.sh")
    ort.set_default_logger_severity(3)
    T.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)  # as tests/conftest.py builds the BERT
        config = _config("bert")
        getattr(T, config.architectures[0])(config).save_pretrained(folder)
        result = export_hf(folder, opset=17, dynamo=False)
    half = convert_float_to_float16(result.model, keep_io_types=True)
    tap = patch_model(half)[1][0].tap
    probe = ort.InferenceSession(_with_outputs(half, [tap]).SerializeToString())

    seeds = [s for r in _ranges(args.seeds) for s in r]
    differ: list[tuple[int, float]] = []
    no_gap: list[int] = []  # inputs whose peaks leave no gap to cut in: the test fails these too
    worst = 0.0
    for i, seed in enumerate(seeds):
        inputs = result.family.make_inputs(result.config, 3, 13, np.random.default_rng(seed))
        try:
            detector = _peak_detector(probe.run(None, inputs)[1])
        except AssertionError:
            no_gap.append(seed)
            continue
        patched, _ = patch_model(half, detector)
        model = _with_outputs(patched, _atpatch_io(patched)[:2])
        kernel = create_session(model, use_native=True).run(None, inputs)[0]
        function = create_session(model, use_native=False).run(None, inputs)[0]
        diff = float(np.abs(kernel - function).max())
        worst = max(worst, diff)
        if diff > LOGIT_ATOL:
            differ.append((seed, diff))
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(seeds)} seeds, {len(differ)} differ", file=sys.stderr)
    checked = len(seeds) - len(no_gap)
    print(
        f"seeds {args.seeds}: {len(differ)} of {checked} differ by more than {LOGIT_ATOL} (max {worst:.3g}); "
        f"{len(no_gap)} without a wide gap to cut the detector in"
    )
    for seed, diff in differ:
        print(f"  seed {seed}: {diff:.3g}")
    row = {
        "seeds": args.seeds,
        "count": checked,
        "differ": len(differ),
        "no_gap_seeds": no_gap,
        "differing_seeds": [s for s, _ in differ],
        "max_abs_logit_diff": worst,
        "tolerance": LOGIT_ATOL,
        "command": " ".join(["python benchmarks/fp16_agreement.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    casekit.write_atomic(RESULTS, json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

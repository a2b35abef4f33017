"""The native AtPatch op inside an onnxruntime-gpu CUDA session: outputs against the CPU kernel, time
against onnxruntime's fused CUDA attention (issue 16, item 3). scripts/gpu_selftest.sh runs it on a GPU
machine once onnxruntime-gpu and a CUDA build of the library are there.

    python scripts/gpu_session_check.py --library build-cuda/libatpatch_ops.so --out $OUT
    python scripts/gpu_session_check.py --device cpu --model tabular-bert   # the wiring, on any machine

1. The op alone, on fresh random maps (masked rows and columns, a random detector, forced columns):
   the CUDA session's patched map, flags and scores against a CPU session's (the CPU kernel), float32
   (atol 1e-5) and float16 (atol 1e-3). onnxruntime may not fall back to its CPU provider for the op:
   the session refuses to start instead (session.disable_cpu_ep_fallback).
2. A patched BERT (random weights, benchmarks/latency_models.py), pass-through and flagging detectors:
   the CUDA session's outputs against the CPU session's, TF32 off (atol 1e-3: the model's GEMMs differ).
3. Time on the device (latency.py's paired_ratios: each round runs every variant in a fresh random order;
   a ratio is the median over rounds of variant / fused): the plain export, onnxruntime's optimized
   model (attention fused into its CUDA kernel, the map never written) and the patched model (native
   kernel; clean inputs, and every input flagged), and the same after `--fuse-attention` (the fused
   AtPatchAttention op, whose CUDA kernel forms the map in its workspace). The fused op alone is also
   checked against the CPU kernel (float32, atol 1e-5: the device's expf and the softmax's sum order
   differ from the CPU's). Targets: the ops equal to the CPU kernel; the fused patched model within
   1.15x of the fused unpatched model.

Writes gpu_session_check.json (into --out) and prints a table. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from latency import flagging_model, paired_ratios  # noqa: E402
from latency_models import BENCHES  # noqa: E402
from onnxruntime.transformers.optimizer import optimize_model  # noqa: E402

from atpatch.ops import spec  # noqa: E402
from atpatch.ops.standalone import fused_standalone_model, standalone_model  # noqa: E402
from atpatch.rewrite import patch_model  # noqa: E402
from atpatch.rewrite.fuse import fuse_attention  # noqa: E402
from atpatch.runtime import native  # noqa: E402

PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
OP_SHAPES = ((1, 2, 5, 5), (2, 4, 17, 17), (3, 3, 7, 12), (8, 12, 128, 128), (8, 12, 512, 512))


def session(model: onnx.ModelProto, library: Path, device: str, strict: bool = False) -> ort.InferenceSession:
    """`strict`: the CUDA provider alone, and no fallback to the CPU one (the op must run on the GPU)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(str(library))
    providers: list = [PROVIDER[device]]
    if device == "cuda":
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"})]  # TF32 GEMMs would not match the CPU's
        if strict:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        else:
            providers.append("CPUExecutionProvider")
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def random_case(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A softmax map with masked key columns per item, some padded query rows, a random detector, forced keys."""
    b, h, q, k = shape
    logits = rng.standard_normal(shape).astype(np.float32) * 2
    keep = rng.random((b, 1, 1, k)) > 0.2
    keep[..., -1] = True
    logits = np.where(keep, logits, -np.inf)
    attention = np.exp(logits - logits.max(-1, keepdims=True))
    attention = (attention / attention.sum(-1, keepdims=True)).astype(np.float32)
    features = spec.num_features(h)
    return {
        "attention": attention,
        "w1": (rng.standard_normal((features, 8)) * 0.5).astype(np.float32),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": rng.standard_normal(8).astype(np.float32),
        "b2": np.zeros(1, np.float32),
        "forced": rng.random((b, k)) < 0.05,
    }


def check_op(library: Path, device: str, rng: np.random.Generator) -> list[dict]:
    rows = []
    for dtype, atol in ((onnx.TensorProto.FLOAT, 1e-5), (onnx.TensorProto.FLOAT16, 1e-3)):
        model = standalone_model(dtype=dtype, threshold=0.5)
        on_device, on_cpu = session(model, library, device, strict=True), session(model, library, "cpu")
        for shape in OP_SHAPES:
            feeds = random_case(rng, shape)
            if dtype == onnx.TensorProto.FLOAT16:
                feeds["attention"] = feeds["attention"].astype(np.float16)
            got, want = on_device.run(None, feeds), on_cpu.run(None, feeds)
            diff = float(np.abs(got[0].astype(np.float32) - want[0].astype(np.float32)).max())
            flags_equal = bool(np.array_equal(got[1], want[1]))
            finite = np.isfinite(want[2])
            scores = float(np.abs(got[2][finite] - want[2][finite]).max()) if finite.any() else 0.0
            rows.append(
                {
                    "check": "op",
                    "dtype": "float16" if dtype == onnx.TensorProto.FLOAT16 else "float32",
                    "shape": list(shape),
                    "max_diff": diff,
                    "flags_equal": flags_equal,
                    "scores_max_diff": scores,
                    "flagged": int(want[1].sum()),
                    "passed": diff <= atol and flags_equal and bool(np.array_equal(finite, np.isfinite(got[2]))),
                }
            )
    return rows


def check_fused_op(library: Path, device: str, rng: np.random.Generator) -> list[dict]:
    """AtPatchAttention on the device against the CPU kernel (float32 only; the same random cases as
    tests/test_fused_attention.py: masks, broadcasts, flags)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fused_cases import random_case as fused_case

    rows = []
    for shape, bias in (((2, 4, 37, 37), "padding"), ((1, 12, 128, 128), "causal"), ((8, 12, 512, 512), "padding")):
        case = fused_case(rng, shape, depth=64, width=64, bias=bias, flags="some", forced="[B,K]", scale=0.125)
        model = fused_standalone_model(scale=case.scale)
        got = session(model, library, device, strict=True).run(None, case.feeds)
        want = session(model, library, "cpu").run(None, case.feeds)
        diff = float(np.abs(got[0] - want[0]).max())
        flags_equal = bool(np.array_equal(got[1], want[1]))
        rows.append({"check": "fused op", "dtype": "float32", "shape": list(shape), "max_diff": diff,
                     "flags_equal": flags_equal, "flagged": int(want[1].sum()),
                     "passed": diff <= 1e-5 and flags_equal})  # fmt: skip
    return rows


def check_model(args: argparse.Namespace, library: Path, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    bench = BENCHES[args.model]
    base = onnx.load(str(bench.export(args.cache_dir)))
    fused = optimize_model(
        onnx.load(str(bench.export(args.cache_dir))),  # optimize_model edits the proto it is given
        bench.ort_type,
        bench.heads,
        bench.hidden,
        opt_level=0,
        use_gpu=args.device == "cuda",
    ).model
    passing = patch_model(base, None)[0]
    fused_passing = fuse_attention(passing)[0]
    on_cpu = {
        "unpatched": session(base, library, "cpu"),
        "patched/pass": session(passing, library, "cpu"),
        "fused/pass": session(fused_passing, library, "cpu"),
    }
    # paired_ratios times round-robin against its "unpatched" session: here the fused one.
    on_device = {
        "unpatched": session(fused, library, args.device),
        "plain": session(base, library, args.device),
        "patched/pass": session(passing, library, args.device),
        "fused/pass": session(fused_passing, library, args.device),
    }
    agreement, latency = [], []
    for seq, batch in bench.cells if not args.cells else [tuple(map(int, c.split("x"))) for c in args.cells]:
        feeds = bench.feeds(seq, batch, rng)
        # latency.py's flagging detector, its threshold lowered until it flags these inputs
        unpatched = on_cpu["unpatched"].run(None, feeds)[0]
        flagging, on_cpu["patched/flag"] = flagging_model(
            base, bench, feeds, unpatched, lambda model: session(model, library, "cpu")
        )
        on_device["patched/flag"] = session(flagging, library, args.device)
        on_cpu["fused/flag"] = session(fuse_attention(flagging)[0], library, "cpu")
        on_device["fused/flag"] = session(fuse_attention(flagging)[0], library, args.device)
        for name in ("patched/pass", "patched/flag", "fused/pass", "fused/flag"):
            got, want = on_device[name].run(None, feeds)[0], on_cpu[name].run(None, feeds)[0]
            diff = float(np.abs(got - want).max())
            agreement.append({"check": "model", "variant": name, "seq": seq, "batch": batch, "max_diff": diff,
                              "passed": diff <= 1e-3})  # fmt: skip
        # One session per variant, as latency.py times BERT-base (this script's default model).
        timed = {name: [s] for name, s in on_device.items()}
        ms, wall, _ = paired_ratios(timed, feeds, warmup=3, runs=args.rounds, budget_s=30)
        cell = {"seq": seq, "batch": batch, "ort_fused_ms": ms}
        cell.update({f"{k}_vs_ort_fused": v for k, v in wall.items() if k != "unpatched"})
        latency.append(cell)
    return agreement, latency


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=sorted(PROVIDER), default="cuda", help="cpu: the wiring only")
    p.add_argument("--library", type=Path, help="the AtPatch library (default: atpatch's own lookup)")
    fusable = sorted(name for name, bench in BENCHES.items() if bench.ort_type is not None)
    p.add_argument("--model", choices=fusable, default="bert-base", help="a BERT: ORT fuses its attention")
    p.add_argument("--cells", nargs="*", help="SEQxBATCH cells (default: the model's)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("ATPATCH_BENCH_CACHE", Path.home() / ".cache" / "atpatch-bench")),
    )
    args = p.parse_args(argv)
    if PROVIDER[args.device] not in ort.get_available_providers():
        print(
            f"gpu_session_check: onnxruntime {ort.__version__} has no {PROVIDER[args.device]}; install onnxruntime-gpu"
        )
        return 2
    library = args.library or native.library_path()
    if library is None or not Path(library).is_file():
        print("gpu_session_check: no AtPatch library; build one (cmake -DATPATCH_CUDA=ON) and pass --library")
        return 2
    rng = np.random.default_rng(args.seed)
    print(f"gpu_session_check: onnxruntime {ort.__version__} on {args.device}, library {library}")
    op_rows = check_op(Path(library), args.device, rng)
    for r in op_rows:
        verdict = "ok" if r["passed"] else "FAILED"
        print(f"  op {r['dtype']:>7} {str(r['shape']):>18}: max diff {r['max_diff']:.2g}, "
              f"flags equal {r['flags_equal']}, {r['flagged']} flagged: {verdict}")  # fmt: skip
    fused_rows = check_fused_op(Path(library), args.device, rng)
    for r in fused_rows:
        verdict = "ok" if r["passed"] else "FAILED"
        print(f"  fused op {str(r['shape']):>18}: max diff {r['max_diff']:.2g}, flags equal {r['flags_equal']}, "
              f"{r['flagged']} flagged: {verdict}")  # fmt: skip
    op_rows += fused_rows
    model_rows, latency = check_model(args, Path(library), rng)
    for r in model_rows:
        print(f"  {r['variant']:>12} {r['seq']:>4} x {r['batch']:<3}: max diff {r['max_diff']:.2g}: "
              f"{'ok' if r['passed'] else 'FAILED'}")  # fmt: skip
    for c in latency:
        ratios = ", ".join(
            f"{k.removesuffix('_vs_ort_fused')} {v:.3f}x" for k, v in c.items() if k.endswith("_vs_ort_fused")
        )
        print(f"  time {c['seq']:>4} x {c['batch']:<3}: ORT fused {c['ort_fused_ms']:.3f} ms; vs it: {ratios}")
    passed = all(r["passed"] for r in op_rows + model_rows)
    record = {
        "device": args.device,
        "onnxruntime": ort.__version__,
        "model": args.model,
        "seed": args.seed,
        "op": op_rows,
        "model_agreement": model_rows,
        "latency": latency,
        "passed": passed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_session_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"gpu_session_check: {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a patched model's time goes, node by node: onnxruntime's profiler on the AtPatch op.

    python benchmarks/op_profile.py                          # BERT-base, seq 512, batch 1
    python benchmarks/op_profile.py --model vit-small --seq 50 --batch 1 --label after
    python benchmarks/op_profile.py --flagging                # every input flagged: the patch and pass 2

Runs the model patched with a pass-through detector (what a clean input costs; `--flagging`: the
latency benchmark's flagging detector, so every input takes the patch and cross-layer patching's
second pass) twice, with the native kernel and with the ONNX function, under onnxruntime's node
profiler, and splits each run's node time into the op (the kernel, or the function's inlined nodes
and its branches), the model, the model's second pass and cross-layer patching's glue (the other
atpatch/ nodes). The op's nodes are listed by cost, so a
change to the op can be judged pass by pass; `--label` keys the record in
benchmarks/results/op_profile.json, so a profile taken before a change stays next to the one after.

The profiler's own overhead inflates small nodes; the latency benchmark (latency.py), not this,
holds the targets.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from casekit import write_atomic
from latency import flagging_model
from latency_models import BENCHES

from atpatch.ops.function import SUBGRAPH_PREFIX
from atpatch.rewrite import patch_model
from atpatch.rewrite.crosslayer import PASS2
from atpatch.runtime import create_session, native

RESULTS = Path(__file__).resolve().parent / "results" / "op_profile.json"


def _group(name: str) -> str:
    """The op, the model's second pass, cross-layer glue or the model, from a profiled node's name."""
    if "AtPatch" in name:  # the kernel's node, the function's inlined nodes and its branches' (SUBGRAPH_PREFIX)
        return "op"
    if name.startswith(PASS2):
        return "second pass"
    if name.startswith("atpatch/"):
        return "cross-layer"
    return "model"


def _node(name: str) -> str:
    """A node's name summed over layers: the kernel's without its layer, the function's without onnxruntime's
    per-layer inlining prefix and fusion suffix (a branch's nodes keep their branch: "peak/reducemax_1")."""
    inlined = re.match(r"^.*_inlfunc_AtPatch_(token_\d+_)?(.*)$", name)
    if inlined is None:
        return name.split("/")[-1]
    return re.sub(r"/\w+Fusion/?$", "", inlined.group(2)).removeprefix(SUBGRAPH_PREFIX)


def profile(model: onnx.ModelProto, feeds: dict[str, np.ndarray], use_native: bool, runs: int) -> dict:
    """Per-run milliseconds of each group and of the op's nodes (by op type and name), from onnxruntime's profiler."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3  # the cross-layer If's implicit-input renames warn once per weight
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        if use_native:
            options.register_custom_ops_library(str(native.library_path()))
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # warm-up, profiled too: dropped below by counting runs
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, feeds)
        wall = (time.perf_counter() - start) / runs
        events = json.loads(Path(session.end_profiling()).read_text())
    groups: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op_type = e["args"].get("op_name", "?")
        if op_type == "If":  # its branch's nodes are profiled on their own: counting it too would count them twice
            continue
        name = e["name"].removesuffix("_kernel_time")
        groups[_group(name)] += e["dur"]
        if _group(name) == "op":
            nodes[f"{op_type} {_node(name)}"] += e["dur"]
    per_run = lambda us: us / (runs + 1) / 1000  # noqa: E731 - microseconds over every profiled run -> ms per run
    return {
        "wall_ms": 1000 * wall,
        "groups_ms": {k: per_run(v) for k, v in groups.items()},
        "op_nodes_ms": {k: per_run(v) for k, v in nodes.most_common()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(BENCHES), default="bert-base")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=5, help="profiled runs per variant (default 5)")
    p.add_argument("--top", type=int, default=12, help="op nodes listed per variant (default 12)")
    p.add_argument("--label", default="current", help="key of this profile in the results file (default: current)")
    p.add_argument("--flagging", action="store_true", help="a detector that flags some columns of every input")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("ATPATCH_BENCH_CACHE", Path.home() / ".cache" / "atpatch-bench")),
    )
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    bench = BENCHES[args.model]
    base = onnx.load(str(bench.export(args.cache_dir)))
    feeds = bench.feeds(args.seq, args.batch, np.random.default_rng(0))
    if args.flagging:
        unpatched = create_session(base, use_native=False).run(None, feeds)[0]
        patched = flagging_model(base, bench, feeds, unpatched, lambda model: create_session(model, use_native=True))[0]
    else:
        patched = patch_model(base, None)[0]
    record = {"model": args.model, "seq": args.seq, "batch": args.batch, "runs": args.runs, "flagging": args.flagging}
    detector = "flagging" if args.flagging else "pass-through"
    print(f"{bench.describe}, seq {args.seq} x batch {args.batch}, {detector} detector; ms per run (profiled)")
    for form, use_native in (("native", True), ("function", False)):
        got = profile(patched, feeds, use_native, args.runs)
        record[form] = got
        g = got["groups_ms"]
        total = sum(g.values())
        print(
            f"\n{form}: wall {got['wall_ms']:.2f} ms; nodes {total:.2f} ms = model {g.get('model', 0):.2f} + "
            f"op {g.get('op', 0):.2f} ({100 * g.get('op', 0) / total:.1f}%) + second pass "
            f"{g.get('second pass', 0):.2f} + cross-layer {g.get('cross-layer', 0):.2f}"
        )
        for name, ms in list(got["op_nodes_ms"].items())[: args.top]:
            print(f"  {ms:8.3f} ms  {name}")
    old = json.loads(args.results.read_text()) if args.results.is_file() else {}
    key = f"{args.model}/{args.seq}x{args.batch}" + ("/flagging" if args.flagging else "")
    old.setdefault(key, {})[args.label] = {**record, "date": time.strftime("%Y-%m-%d"), "onnxruntime": ort.__version__}
    write_atomic(args.results, json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of `atpatch demo`, the README's first command (target: under 2 minutes on 2 cores).

Runs `atpatch demo` in a fresh process, as a newcomer would, `--runs` times, each into a new
folder, and reports wall-clock and CPU time per run with the demo's own figures (read from the
eval.json it writes). The machine's load average is recorded beside them: on a shared machine
the wall time says as much about the neighbours as about atpatch.

    python benchmarks/demo.py             # one run, ~1-2 minutes
    python benchmarks/demo.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 120.0
RESULTS = Path(__file__).resolve().parent / "results"
DEMO = "import sys; from atpatch.cli import main; sys.exit(main())"


def _one_run(cwd: Path) -> dict[str, float | str]:
    """`atpatch demo` exactly as the README runs it: in a new folder, default --dir (atpatch-demo)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", DEMO, "demo"], stdout=subprocess.PIPE, cwd=cwd)
    assert child.stdout is not None
    out = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"atpatch demo failed (exit {os.waitstatus_to_exitcode(status)}):\n{out}")
    report = json.loads((cwd / "atpatch-demo" / "eval.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "load_before": round(load, 2),
        "asr_before": report["original"]["attack_success_rate"],
        "asr_after": report["patched"]["attack_success_rate"],
        "clean_accuracy_before": report["original"]["clean_accuracy"],
        "clean_accuracy_after": report["patched"]["clean_accuracy"],
        "clean_flag_rate": report["patched"]["flag_rate_clean"],
        "agreement": next((line.strip() for line in out.splitlines() if line.startswith("native kernel")), "?"),
        "output": out,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="how many demo runs (default 1)")
    args = parser.parse_args()
    rows = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="atpatch-demo-bench-") as tmp:
            rows.append(_one_run(Path(tmp)))
    print(f"atpatch demo, {os.cpu_count()} CPUs; target: under {TARGET_S:.0f} s wall")
    print(" run | wall s | CPU s | load avg before | ASR before -> after | clean acc before -> after | clean flagged")
    print("-" * 104)
    for i, r in enumerate(rows, start=1):
        print(
            f" {i:>3} | {r['wall_s']:>6} | {r['cpu_s']:>5} | {r['load_before']:>15} | "
            f"{100 * r['asr_before']:>6.1f}% -> {100 * r['asr_after']:.1f}% | "
            f"{100 * r['clean_accuracy_before']:>12.1f}% -> {100 * r['clean_accuracy_after']:.1f}% | "
            f"{100 * r['clean_flag_rate']:.1f}%"
        )
    worst = max(float(r["wall_s"]) for r in rows)
    verdict = f"slowest wall {worst:.1f} s (target < {TARGET_S:.0f} s: {'met' if worst < TARGET_S else 'MISSED'})"
    print(rows[-1]["agreement"])
    print(verdict)
    RESULTS.mkdir(exist_ok=True)
    record = {
        "command": "python benchmarks/demo.py" + (f" --runs {args.runs}" if args.runs != 1 else ""),
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "rows": [{k: v for k, v in r.items() if k != "output"} for r in rows],
        "verdict": verdict,
        "demo_output": rows[-1]["output"],
    }
    (RESULTS / "demo.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())

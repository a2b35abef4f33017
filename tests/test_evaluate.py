"""Original vs patched in onnxruntime: every metric checked against a computation by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from evalkit_models import (
    HEADS,
    TinyText,
    feature_detector,
    flag_everything,
    flag_only_padding,
    sentences,
    tiny_text_model,
)

from atpatch.data import Dataset, load_jsonl, save_jsonl
from atpatch.detector.probe import AttentionProbe
from atpatch.errors import AtPatchError
from atpatch.evaluate import evaluate
from atpatch.ops.reference import column_scores, flag_columns
from atpatch.ops.weights import Calibration
from atpatch.rewrite import patch_model
from atpatch.runtime import create_session

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyText:
    return tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def sets(tiny: TinyText, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    """Clean texts of varied length (so batches are padded), the same with "cf" in front, the
    same with he/she swapped (a counterfactual), and with he/she/his/her made "they" (the
    attribute masked), aligned row by row."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("data")
    texts = sentences(30, rng)
    labels = rng.integers(0, 2, size=30).tolist()
    swap = {"he": "she", "she": "he", "his": "her", "her": "his"}
    clean = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    triggered = [{"text": "cf " + t, "label": y, "culprit": [0, 2]} for t, y in zip(texts, labels, strict=True)]
    counter = [
        {"text": " ".join(swap.get(w, w) for w in t.split()), "label": y} for t, y in zip(texts, labels, strict=True)
    ]
    masked = [
        {"text": " ".join("they" if w in swap else w for w in t.split()), "label": y}
        for t, y in zip(texts, labels, strict=True)
    ]
    return {
        name: load_jsonl(save_jsonl(folder / f"{name}.jsonl", rows), tiny.folder)
        for name, rows in (("clean", clean), ("triggered", triggered), ("counterfactual", counter), ("masked", masked))
    }


def _predict(model, data: Dataset) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Logits and predictions from a plain session, one batch: independent of evaluate's batching."""
    session = create_session(model)
    names = [i.name for i in session.get_inputs()]
    logits = session.run(None, {n: data.feeds[n] for n in names})[0]
    return logits, logits.argmax(axis=1)


def test_pass_through_patch_changes_nothing(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    patched, _ = patch_model(tiny.model)
    clean, triggered = sets["clean"], sets["triggered"]
    group = np.arange(len(clean)) % 2
    report = evaluate(
        tiny.model,
        patched,
        clean,
        triggered,
        target=1,
        counterfactual=sets["counterfactual"],
        group=group,
        batch_size=7,
        progress=False,
    )

    _, pred = _predict(tiny.model, clean)
    _, pred_t = _predict(tiny.model, triggered)
    _, pred_c = _predict(tiny.model, sets["counterfactual"])
    victims = triggered.labels != 1
    positive = pred == 1
    expected = {
        "clean_accuracy": np.mean(pred == clean.labels),
        "attack_success_rate": np.mean(pred_t[victims] == 1),
        "counterfactual_flip_rate": np.mean(pred_c != pred),
        "parity_gap": abs(positive[group == 1].mean() - positive[group == 0].mean()),
    }
    for key, value in expected.items():
        assert getattr(report.original, key) == pytest.approx(value), key
        assert getattr(report.patched, key) == pytest.approx(value), key
    assert report.patched.flag_rate_clean == 0.0 and report.patched.flag_rate_triggered == 0.0
    assert report.patched.culprit_flag_rate == 0.0
    assert report.identical_clean == 1.0
    assert report.original.flag_rate_clean is None  # the original has no detector
    assert (report.n_clean, report.n_triggered, report.n_counterfactual, report.target) == (30, 30, 30, 1)


def test_the_oracle_is_the_original_with_the_known_culprits_patched_in_every_layer(
    tiny: TinyText, sets: dict[str, Dataset]
) -> None:
    """Computed again in PyTorch with the numpy reference: the culprit positions forced in every softmax."""
    import transformers as T
    from torch_reference import forward, patched_softmax

    from atpatch.ops.weights import Detector

    triggered = sets["triggered"]
    report = evaluate(
        tiny.model,
        patch_model(tiny.model, feature_detector(2, "mass", 3.5))[0],
        sets["clean"],
        triggered,
        target=1,
        batch_size=8,
        progress=False,
    )
    forced = np.zeros(triggered.feeds["input_ids"].shape, bool)
    for i, positions in enumerate(triggered.culprits):
        forced[i, positions] = True
    model = T.AutoModelForSequenceClassification.from_pretrained(tiny.folder, attn_implementation="eager").eval()
    with patched_softmax(Detector.pass_through([HEADS] * 2).layers, forced=forced):
        logits = forward(model, dict(triggered.feeds))
    victims = triggered.labels != 1
    expected = float((logits.argmax(axis=1)[victims] == 1).mean())
    assert report.oracle_attack_success_rate == pytest.approx(expected)
    assert forced.any(axis=1).all() and not forced.all(axis=1).any()  # every input has culprits, not only culprits
    assert "(oracle)" in report.to_markdown() and report.to_dict()["oracle_attack_success_rate"] == expected


def test_no_oracle_without_every_victims_culprits(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    triggered = sets["triggered"]
    first = int(np.flatnonzero(triggered.labels != 1)[0])  # a victim: the oracle's ASR counts victims only
    unknown = replace(triggered, culprits=[None if i == first else c for i, c in enumerate(triggered.culprits)])
    report = evaluate(
        tiny.model,
        patch_model(tiny.model, feature_detector(2, "mass", 3.5))[0],
        sets["clean"],
        unknown,
        target=1,
        progress=False,
    )
    assert report.oracle_attack_success_rate is None and "(oracle)" not in report.to_markdown()


def test_flagging_every_column_is_reported_but_leaves_outputs_identical(
    tiny: TinyText, sets: dict[str, Dataset]
) -> None:
    # By the spec, a row whose unmasked entries are all flagged is returned unchanged.
    patched, _ = patch_model(tiny.model, flag_everything(2))
    report = evaluate(tiny.model, patched, sets["clean"], sets["triggered"], target=0, progress=False)
    assert report.patched.flag_rate_clean == 1.0 and report.patched.flag_rate_triggered == 1.0
    assert report.patched.culprit_flag_rate == 1.0
    assert report.identical_clean == 1.0
    assert report.patched.clean_accuracy == report.original.clean_accuracy


@pytest.mark.parametrize("calibrated_on", ["shorter", "alike"])
def test_more_flags_than_calibration_promised_are_explained(
    tiny: TinyText, sets: dict[str, Dataset], calibrated_on: str
) -> None:
    """The patched model carries what its thresholds promise (fit records it); when the clean flag rate's
    interval lies above it, eval says so, names longer inputs when they are, and says what to do."""
    clean = sets["clean"]
    median = float(np.median(clean.lengths()))
    length = median / 3 if calibrated_on == "shorter" else median
    promise = Calibration(0.005, 400, length)
    patched, _ = patch_model(tiny.model, replace(flag_everything(2), calibration=promise))
    report = evaluate(tiny.model, patched, clean, progress=False)
    assert report.calibration == promise and report.clean_length == median
    text = report.to_markdown()
    assert "more clean inputs are flagged than the detector was calibrated for (at most 0.50%" in text
    assert "fit it again with --calibration inputs like the ones the model will see" in text
    assert (f"median of {median:.0f} tokens, its calibration inputs {length:.0f}" in text) == (
        calibrated_on == "shorter"
    )
    assert report.to_dict()["calibration"] == {"flag_rate": 0.005, "inputs": 400, "length": length}


def test_no_note_when_flags_stay_within_the_promise(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    quiet = replace(flag_only_padding(2), calibration=Calibration(0.005, 400, 3.0))
    report = evaluate(tiny.model, patch_model(tiny.model, quiet)[0], sets["clean"], progress=False)
    assert report.patched.flag_rate_clean == 0.0 and report.calibration == quiet.calibration
    assert "calibrated for" not in report.to_markdown()


def test_padded_columns_never_count_as_flagged(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    clean = sets["clean"]
    assert (clean.feeds["attention_mask"] == 0).any()  # the set is padded
    patched, _ = patch_model(tiny.model, flag_only_padding(2))
    # Only all-zero (padded) key columns score above the threshold: nothing real is flagged.
    first_pass, _ = patch_model(tiny.model, flag_only_padding(2), cross_layer=False)
    scores = column_scores(AttentionProbe(first_pass).run(dict(clean.feeds)).before[0], flag_only_padding(1).layers[0])
    assert (scores[clean.feeds["attention_mask"] == 0] > 0).all()
    report = evaluate(tiny.model, patched, clean, batch_size=4, progress=False)
    assert report.patched.flag_rate_clean == 0.0 and report.identical_clean == 1.0


def test_a_real_detector_flags_and_changes_what_the_reference_says(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    detector = feature_detector(2, "mass", 3.5)
    patched, _ = patch_model(tiny.model, detector)
    clean, triggered = sets["clean"], sets["triggered"]
    report = evaluate(tiny.model, patched, clean, triggered, target=1, batch_size=8, progress=False)

    first_pass, _ = patch_model(tiny.model, detector, cross_layer=False)  # its maps are the first pass's

    def flagged_by_reference(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
        out = AttentionProbe(first_pass).run(dict(data.feeds))
        cols = np.zeros(data.feeds["attention_mask"].shape, bool)
        for before, layer in zip(out.before, detector.layers, strict=True):
            cols |= flag_columns(before, layer)  # a column flagged in any layer is patched in every layer
        return cols.any(axis=1), cols

    any_clean, _ = flagged_by_reference(clean)
    any_trig, cols_trig = flagged_by_reference(triggered)
    assert 0 < any_clean.mean() < 1  # the threshold splits the set: a meaningful check
    assert report.patched.flag_rate_clean == pytest.approx(any_clean.mean())
    assert report.patched.flag_rate_triggered == pytest.approx(any_trig.mean())
    assert report.patched.culprit_flag_rate == pytest.approx(cols_trig[:, 1].mean())  # "cf" is token 1
    assert np.array_equal(report.flags["clean"], any_clean)

    logits_o, pred_o = _predict(tiny.model, clean)
    logits_p, pred_p = _predict(patched, clean)
    same = (logits_o == logits_p).all(axis=1)
    assert report.identical_clean == pytest.approx(same.mean())
    assert not same.all()  # the patch does change some outputs...
    assert same[~any_clean].all()  # ...but only of inputs with a flag: nothing flagged, bit-identical
    assert report.patched.clean_accuracy == pytest.approx(np.mean(pred_p == clean.labels))
    assert report.original.clean_accuracy == pytest.approx(np.mean(pred_o == clean.labels))
    _, pred_tp = _predict(patched, triggered)
    victims = triggered.labels != 1
    assert report.patched.attack_success_rate == pytest.approx(np.mean(pred_tp[victims] == 1))
    assert np.array_equal(report.predictions["triggered"]["patched"], pred_tp)


def test_parity_gap_on_a_constructed_example(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    clean = sets["clean"]
    _, pred = _predict(tiny.model, clean)
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


def test_report_serialises(tiny: TinyText, sets: dict[str, Dataset], tmp_path: Path) -> None:
    patched, _ = patch_model(tiny.model)
    report = evaluate(tiny.model, patched, sets["clean"], sets["triggered"], target=1, progress=True)
    path = report.to_json(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data["patched"]["flag_rate_clean"] == 0.0 and data["target_name"] == "positive"
    assert data["label_names"] == ["negative", "positive"] and "predictions" not in data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left
    table = report.to_markdown()
    assert table.startswith("| metric | original | patched |")
    assert "| clean outputs bit-identical | | 100.0% |" in table
    assert "demographic-parity gap" not in table  # not measured: no row
    assert f"| clean accuracy (CACC) | {100 * report.original.clean_accuracy:.1f}% |" in table
    n = len(sets["clean"].labels)  # nothing flagged: the interval's upper end is what the set size allows
    assert f"clean inputs flagged: 0 of {n}, the true rate within 0.00%-" in table


def test_evaluate_errors_are_one_line(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    patched, _ = patch_model(tiny.model)
    clean = sets["clean"]
    cases = [
        (dict(triggered=sets["triggered"]), "need the backdoor's target label"),
        (dict(target=5), "target 5 is not a label id"),
        (dict(counterfactual=clean.subset([0, 1])), "has 2 rows but the clean set has 30"),
        (dict(group=np.zeros(len(clean))), "both groups present"),
        (dict(batch_size=0), "batch size 0"),
        (dict(masked=clean), r"needs the groups; pass group \(--group-field\)"),
        (dict(masked=clean.subset([0, 1]), group=np.arange(30) % 2), "masked set has 2 rows but the clean set has 30"),
        (dict(masked=replace(clean, labels=1 - clean.labels), group=np.arange(30) % 2), "label at row 0 differs"),
    ]
    for kwargs, match in cases:
        with pytest.raises(AtPatchError, match=match) as info:
            evaluate(tiny.model, patched, clean, progress=False, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(AtPatchError, match="carries no AtPatch node"):
        evaluate(tiny.model, tiny.model, clean, progress=False)
    images = Dataset(
        {"pixel_values": np.zeros((2, 3, 4, 4), np.float32)},
        np.zeros(2, np.int64),
        [None, None],
        None,
        clean.label_names,
    )
    with pytest.raises(AtPatchError, match="needs inputs input_ids, attention_mask"):
        evaluate(tiny.model, patched, images, progress=False)


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
        _, pred = _predict(tiny.model if model == "original" else patched, clean)
        for key, value in _gaps_by_hand(pred, clean.labels, group).items():
            assert getattr(metrics, key) == pytest.approx(value), (model, key)
        assert metrics.parity_gap_above_floor is None and metrics.equalized_odds_gap_above_floor is None
    assert report.parity_gap_floor is None and report.equalized_odds_gap_floor is None  # no masked set given


def test_equalized_odds_gap_on_a_constructed_example(tiny: TinyText, sets: dict[str, Dataset]) -> None:
    """Labels made from the predictions: right in group 0 (TPR 1, FPR 0), wrong in group 1 (TPR 0, FPR 1)."""
    clean = sets["clean"]
    _, pred = _predict(tiny.model, clean)
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
    _, pred = _predict(tiny.model, clean)
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

    _, pred_clean = _predict(tiny.model, clean)
    _, pred_masked = _predict(tiny.model, masked)
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

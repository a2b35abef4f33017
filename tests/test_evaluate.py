"""Original vs patched in onnxruntime: every metric checked against a computation by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from evalkit_models import (
    HEADS,
    TinyText,
    eval_sets,
    feature_detector,
    flag_everything,
    flag_only_padding,
    predict,
    tiny_text_model,
)

from atpatch.data import Dataset
from atpatch.detector.probe import AttentionProbe
from atpatch.errors import AtPatchError
from atpatch.evaluate import evaluate
from atpatch.ops.reference import column_scores, flag_columns
from atpatch.ops.weights import Calibration
from atpatch.rewrite import patch_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyText:
    return tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def sets(tiny: TinyText, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    return eval_sets(tiny, tmp_path_factory.mktemp("data"))


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

    _, pred = predict(tiny.model, clean)
    _, pred_t = predict(tiny.model, triggered)
    _, pred_c = predict(tiny.model, sets["counterfactual"])
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

    logits_o, pred_o = predict(tiny.model, clean)
    logits_p, pred_p = predict(patched, clean)
    same = (logits_o == logits_p).all(axis=1)
    assert report.identical_clean == pytest.approx(same.mean())
    assert not same.all()  # the patch does change some outputs...
    assert same[~any_clean].all()  # ...but only of inputs with a flag: nothing flagged, bit-identical
    assert report.patched.clean_accuracy == pytest.approx(np.mean(pred_p == clean.labels))
    assert report.original.clean_accuracy == pytest.approx(np.mean(pred_o == clean.labels))
    _, pred_tp = predict(patched, triggered)
    victims = triggered.labels != 1
    assert report.patched.attack_success_rate == pytest.approx(np.mean(pred_tp[victims] == 1))
    assert np.array_equal(report.predictions["triggered"]["patched"], pred_tp)


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

"""`atpatch fit --protected`: thresholds chosen by counterfactual flips against accuracy, on a tiny random BERT.

The sweep's table is checked against an independent recomputation (the saved detector exported and run
through `atpatch eval`, and another row's thresholds patched and run directly in onnxruntime).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
from evalkit_models import sentences, tiny_text_model

from atpatch.cli import export_main, main
from atpatch.data import load_jsonl, save_jsonl
from atpatch.detector import Detector

SWAP = {"he": "she", "she": "he", "his": "her", "her": "his"}
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(n: int, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Sentences with one attribute word at a random place, and the same with it flipped."""
    rows, flipped = [], []
    for text in sentences(n, rng):
        words = [w for w in text.split() if w not in SWAP]
        at = int(rng.integers(0, len(words) + 1))
        word = str(rng.choice(list(SWAP)))
        label = int(rng.integers(2))
        female = int(word in ("she", "her"))
        rows.append({"text": " ".join([*words[:at], word, *words[at:]]), "label": label, "group": female})
        flipped.append({"text": " ".join([*words[:at], SWAP[word], *words[at:]]), "label": label, "group": 1 - female})
    return rows, flipped


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fairness")
    tiny = tiny_text_model(d / "hf")
    onnx.save(tiny.model, str(d / "model.onnx"))
    seed = np.random.SeedSequence().entropy % (2**32)
    print(f"random seed: {seed}")
    rng = np.random.default_rng(seed)
    clean, _ = _rows(300, rng)
    validation, counterfactual = _rows(200, rng)
    bad, _ = _rows(40, rng)
    return {
        "dir": d,
        "hf": d / "hf",
        "model": d / "model.onnx",
        "clean": save_jsonl(d / "clean.jsonl", clean),
        "validation": save_jsonl(d / "validation.jsonl", validation),
        "counterfactual": save_jsonl(d / "counterfactual.jsonl", counterfactual),
        "bad": save_jsonl(d / "bad.jsonl", bad),
    }


def _fit_args(setup: dict[str, Path], out: Path) -> list[str]:
    return [
        *("fit", str(setup["model"]), "--hf", str(setup["hf"]), "--clean", str(setup["clean"])),
        *("--misbehaving", str(setup["bad"]), "--protected", "-o", str(out)),
    ]


def _attribute_positions(data_tokens: list[list[str]]) -> list[list[int]]:
    return [[p for p, tok in enumerate(row) if tok in SWAP] for row in data_tokens]


@pytest.fixture(scope="module")
def fitted(setup: dict[str, Path]) -> dict[str, object]:
    """One fairness fit through the command line, what it printed, and the culprits it fitted on."""
    import atpatch.detector.columns as columns

    out = setup["dir"] / "fair.safetensors"
    seen: list[object] = []
    original = columns.collect_columns

    def recording(probe, feeds, culprits=None, batch_size=64, desc=""):  # noqa: ANN001, ANN202
        seen.append(culprits)
        return original(probe, feeds, culprits, batch_size, desc)

    args = [*_fit_args(setup, out), "--validation", str(setup["validation"])]
    args += ["--counterfactual", str(setup["counterfactual"]), "--group-field", "group"]
    args += ["--protected-tokens", "he, she,his,her", "--max-accuracy-drop", "3"]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed):
        patch.setattr(columns, "collect_columns", recording)
        assert main(args) == 0
    return {"out": out, "printed": printed.getvalue(), "culprits": [c for c in seen if c is not None]}


def test_the_chosen_point_has_the_fewest_flips_among_those_keeping_accuracy(fitted: dict[str, object]) -> None:
    out = Path(str(fitted["out"]))
    table = json.loads(out.with_name("fair.tradeoff.json").read_text())
    rows, original = table["candidates"], table["original"]
    assert [r["name"] for r in rows] == ["0.5%", "1%", "2%", "5%", "10%", "20%", "30%", "50%", "nothing flagged"]
    floor = original["accuracy"] - 3 / 100
    assert table["accuracy_floor"] == pytest.approx(floor, abs=1e-12)
    for r in rows:
        assert r["feasible"] == (r["accuracy"] >= floor - 1e-12)
    chosen = rows[table["chosen"]]
    assert chosen["chosen"] and sum(r["chosen"] for r in rows) == 1
    assert chosen["accuracy"] >= floor - 1e-12
    best = min(r["counterfactual_flip_rate"] for r in rows if r["feasible"])
    assert chosen["counterfactual_flip_rate"] == best
    tied = [r for r in rows if r["feasible"] and r["counterfactual_flip_rate"] == best]
    assert chosen["validation_flag_rate"] == min(r["validation_flag_rate"] for r in tied)
    # Flagging nothing is the original, and always feasible.
    nothing = rows[-1]
    assert nothing["validation_flag_rate"] == 0 and nothing["accuracy"] == original["accuracy"]
    assert nothing["counterfactual_flip_rate"] == original["counterfactual_flip_rate"]
    # The saved detector is the chosen row's.
    saved = Detector.load(out)
    assert [lay.threshold for lay in saved.layers] == pytest.approx(chosen["thresholds"], rel=1e-6)
    # The printed table: the original's row, one row per candidate, the chosen one marked, where files went.
    printed = str(fitted["printed"])
    lines = [line for line in printed.splitlines() if " | " in line]
    assert len(lines) == 1 + 1 + len(rows)  # header, original, candidates
    marked = [line for line in lines if line.endswith("<- chosen")]
    assert len(marked) == 1 and marked[0].split("|")[0].strip() == chosen["name"]
    assert f"{100 * chosen['counterfactual_flip_rate']:.2f}%" in marked[0]
    assert f"wrote {out.with_name('fair.tradeoff.png')} and {out.with_name('fair.tradeoff.json')}" in printed
    assert out.with_name("fair.tradeoff.png").read_bytes()[:8] == PNG


def test_the_chosen_row_is_what_atpatch_eval_measures(setup: dict[str, Path], fitted: dict[str, object]) -> None:
    out = Path(str(fitted["out"]))
    table = json.loads(out.with_name("fair.tradeoff.json").read_text())
    chosen, original = table["candidates"][table["chosen"]], table["original"]
    d = setup["dir"]
    patched = d / "fair.patched.onnx"
    assert export_main([str(setup["model"]), "-o", str(patched), "--detector", str(out)]) == 0
    ev = ["eval", str(setup["model"]), str(patched), "--hf", str(setup["hf"]), "--clean", str(setup["validation"])]
    ev += ["--counterfactual", str(setup["counterfactual"]), "--group-field", "group", "--json", str(d / "ev.json")]
    assert main(ev) == 0
    report = json.loads((d / "ev.json").read_text())
    for key, mine in (
        ("clean_accuracy", "accuracy"),
        ("counterfactual_flip_rate", "counterfactual_flip_rate"),
        ("parity_gap", "parity_gap"),
    ):
        assert report["patched"][key] == pytest.approx(chosen[mine], abs=1e-12)
        assert report["original"][key] == pytest.approx(original[mine], abs=1e-12)
    assert report["patched"]["flag_rate_clean"] == pytest.approx(chosen["validation_flag_rate"], abs=1e-12)


def test_the_most_flagging_row_is_what_its_patched_model_runs_give(
    setup: dict[str, Path], fitted: dict[str, object]
) -> None:
    from dataclasses import replace

    from atpatch.rewrite import patch_model
    from atpatch.runtime import create_session

    out = Path(str(fitted["out"]))
    rows = json.loads(out.with_name("fair.tradeoff.json").read_text())["candidates"]
    row = max(rows, key=lambda r: r["validation_flag_rate"])
    saved = Detector.load(out)  # the MLPs are the same for every row; only the thresholds differ
    assert saved.joint is None  # the fairness fit has per-layer thresholds only (rows record thresholds)
    detector = replace(
        saved, layers=tuple(replace(lay, threshold=t) for lay, t in zip(saved.layers, row["thresholds"], strict=True))
    )
    session = create_session(patch_model(onnx.load(str(setup["model"])), detector)[0])
    names = {i.name for i in session.get_inputs()}

    def predict(path: Path) -> tuple[np.ndarray, np.ndarray]:
        data = load_jsonl(path, setup["hf"])
        return session.run(None, {k: v for k, v in data.feeds.items() if k in names})[0].argmax(1), data.labels

    pred, labels = predict(setup["validation"])
    flipped, _ = predict(setup["counterfactual"])
    assert float((pred == labels).mean()) == pytest.approx(row["accuracy"], abs=1e-12)
    assert float((pred != flipped).mean()) == pytest.approx(row["counterfactual_flip_rate"], abs=1e-12)


def test_protected_tokens_are_the_culprit_positions(setup: dict[str, Path], fitted: dict[str, object]) -> None:
    from atpatch.culprits import protected_culprits

    bad = load_jsonl(setup["bad"], setup["hf"])
    assert bad.tokens is not None
    expected = _attribute_positions(bad.tokens)
    assert all(len(p) == 1 for p in expected)  # each row holds one attribute word
    # Independently of the tokens: the word's index in the text, after [CLS].
    words = [json.loads(line)["text"].split() for line in setup["bad"].read_text().splitlines()]
    assert expected == [[1 + next(i for i, w in enumerate(ws) if w in SWAP)] for ws in words]
    assert protected_culprits(bad, ["he", "she", "his", "her"], setup["bad"]).culprits == expected
    assert protected_culprits(bad, ["she"], setup["bad"]).culprits == [
        [p for p, tok in enumerate(row) if tok == "she"] for row in bad.tokens
    ]
    # The fit itself fitted on those positions (the misbehaving inputs' columns were collected with them).
    assert expected in fitted["culprits"]


def test_fairness_fit_without_validation_says_so_in_one_line_and_writes_nothing(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "det.safetensors"
    assert main([*_fit_args(setup, out), "--counterfactual", str(setup["counterfactual"])]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--validation FILE" in err
    assert list(tmp_path.iterdir()) == []
    # The fairness options without --protected are refused too, naming it.
    args = [a for a in _fit_args(setup, out) if a != "--protected"]
    assert main([*args, "--validation", str(setup["validation"])]) == 1
    assert "add --protected" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_fit_help_gives_the_fairness_options_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "in percentage points (default: 0.3)" in text
    assert "JSONL (default: none; required with --protected)" in text
    assert "row by row (default: none; required with --protected)" in text
    assert "for the parity gap (default: no gap)" in text
    assert "(default: culprits from --culprits, JSONL spans, or localization)" in text

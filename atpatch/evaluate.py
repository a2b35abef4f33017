"""Did the patch help? The original and the patched model side by side in onnxruntime.

Both models run on the same batches, so any difference in their outputs comes from the
patch. Backdoor metrics: clean accuracy (CACC) and attack success rate (ASR); fairness
metrics: counterfactual flip rate, demographic-parity gap and equalized-odds gap (the larger of
the groups' true-positive-rate and false-positive-rate gaps, positive = label `POSITIVE`); and,
for the patched model, how often its detector flags anything (in any layer), read from its
AtPatch nodes' flags. Where every triggered input's culprit positions are known, also the
oracle: the ASR of the original with exactly those positions patched in every layer, the best
any detector can reach.

Given the clean set with the protected attribute masked, the original model's parity and
equalized-odds gaps on it are the floor: the gaps a model shows when it ignores the attribute
(the rest of the input still correlates with the group). The floors are report-level
(`EvalReport.parity_gap_floor`, `equalized_odds_gap_floor`; JSON keys of the same names), and
each model's distance above them sits in its own metrics (`parity_gap_above_floor`,
`equalized_odds_gap_above_floor`: gap - floor, negative when under the floor).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from .data import Dataset
from .errors import AtPatchError
from .eval_report import EvalReport, ModelMetrics
from .group_gaps import above, group_gaps
from .progress import Progress

__all__ = [
    "EvalReport", "ModelMetrics", "Run", "check_pair", "evaluate", "oracle_logits", "run_original", "run_patched"
]  # fmt: skip


def _model_feeds(input_names: list[str], data: Dataset, which: str) -> dict[str, np.ndarray]:
    missing = [n for n in input_names if n not in data.feeds]
    if missing:
        raise AtPatchError(
            f"the model needs inputs {', '.join(missing)} that the {which} data lacks (it has "
            f"{', '.join(data.feeds)}); load the data with the model's own folder"
        )
    return {n: data.feeds[n] for n in input_names}


def _logits(values: np.ndarray, which: str) -> np.ndarray:
    if values.ndim != 2:
        raise AtPatchError(
            f"the {which} model's first output has shape {values.shape}; evaluate needs a classifier whose "
            f"first output is [batch, classes] logits"
        )
    return values


@dataclass
class Run:
    """One model's pass over a data set (run_original, run_patched)."""

    logits: np.ndarray
    flagged: np.ndarray  # [N] any column flagged in any layer (all False for the original)
    culprit_flagged: np.ndarray  # [N] any known culprit position flagged (likewise)
    keys: int = 0  # key positions of the attention maps (patched model only)


def _batches(total: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, total, batch_size):
        yield slice(start, min(start + batch_size, total))


def run_original(session, data: Dataset, which: str, batch_size: int = 64, bar: Progress | None = None) -> Run:  # noqa: ANN001
    """Logits of an onnxruntime `session` (any model: original or patched, without reading flags) on `data`."""
    bar = bar or Progress(0, "", enabled=False)
    names = [i.name for i in session.get_inputs()]
    feeds = _model_feeds(names, data, which)
    out_name = session.get_outputs()[0].name
    parts = []
    for part in _batches(len(data), batch_size):
        parts.append(_logits(session.run([out_name], {k: v[part] for k, v in feeds.items()})[0], "original"))
        bar.step(f"original/{which}")
    logits = np.concatenate(parts)
    none = np.zeros(len(logits), bool)  # the original model has no detector
    return Run(logits, none, none)


def run_patched(probe, data: Dataset, which: str, batch_size: int = 64, bar: Progress | None = None) -> Run:  # noqa: ANN001
    """Logits of a patched model (through its AttentionProbe) on `data`, and which inputs it flagged."""
    bar = bar or Progress(0, "", enabled=False)
    feeds = _model_feeds(probe.input_names, data, which)
    logits, flagged, culprit_hit, keys = [], [], [], 0
    for part, out in probe.iter_batches(feeds, batch_size):
        logits.append(_logits(out.outputs[0], "patched"))
        keys = out.union.shape[1]
        flagged.append(out.union.any(axis=1))  # flagged in any layer: patched in every layer
        for row, culprit in zip(out.union, data.culprits[part], strict=True):
            culprit_hit.append(bool(culprit) and bool(row[[p for p in culprit if p < row.shape[0]]].any()))
        bar.step(f"patched/{which}")
    return Run(np.concatenate(logits), np.concatenate(flagged), np.asarray(culprit_hit, bool), keys)


def oracle_logits(original: onnx.ModelProto, data: Dataset, keys: int, batch_size: int = 64) -> np.ndarray:
    """`original`'s logits with each input's culprit positions (among `keys` key positions: the padded
    sequence length, or 1 + patches for a ViT) patched in every layer, and nothing else.

    The ideal patch: what a detector that finds exactly the culprits would give. Every input needs
    its culprits (`Dataset.culprits`); positions past `keys` (truncated away) are left out.
    """
    from .rewrite import patch_model
    from .rewrite.crosslayer import FORCED_INPUT
    from .runtime import create_session

    forced = np.zeros((len(data), keys), np.bool_)
    for i, positions in enumerate(data.culprits):
        if positions is None:
            raise AtPatchError(f"input {i} has no culprit positions: the oracle needs every input's culprits")
        forced[i, [p for p in positions if p < keys]] = True
    session = create_session(patch_model(original, forced_input=True)[0])
    names = [i.name for i in session.get_inputs() if i.name != FORCED_INPUT]
    feeds = {**_model_feeds(names, data, "oracle"), FORCED_INPUT: forced}
    out_name = session.get_outputs()[0].name
    parts = [
        _logits(session.run([out_name], {k: v[part] for k, v in feeds.items()})[0], "oracle")
        for part in _batches(len(data), batch_size)
    ]
    return np.concatenate(parts)


def _check_aligned(name: str, data: Dataset | np.ndarray, clean: Dataset) -> None:
    if len(data) != len(clean):
        raise AtPatchError(
            f"{name} has {len(data)} rows but the clean set has {len(clean)}; it must be aligned row by row with it"
        )


def check_pair(original: onnx.ModelProto, patched: onnx.ModelProto) -> None:
    """Refuse a pair that is not an original and a patch of it: the figures would compare two models."""
    from .detector.probe import patch_nodes, read_detector
    from .modelio import model_fingerprint

    try:
        read_detector(patched)  # a patched model of this op version, or a clear error
    except ValueError as err:
        raise AtPatchError(
            "the patched model carries no AtPatch node; patch the original with atpatch-export and pass its output"
        ) from err
    if patch_nodes(original):
        raise AtPatchError("the original model is itself patched; pass the unpatched model first, the patched second")
    source = next((p.value for p in patched.metadata_props if p.key == "atpatch.source_fingerprint"), None)
    if source is not None and source != (fingerprint := model_fingerprint(original)):
        raise AtPatchError(
            f"the patched model was patched from another model (fingerprint {source}), not this original "
            f"({fingerprint}); pass the model it was patched from, or patch this one with atpatch-export"
        )


def evaluate(
    original: onnx.ModelProto,
    patched: onnx.ModelProto,
    clean: Dataset,
    triggered: Dataset | None = None,
    target: int | None = None,
    counterfactual: Dataset | None = None,
    group: np.ndarray | None = None,
    batch_size: int = 64,
    progress: bool = True,
    masked: Dataset | None = None,
) -> EvalReport:
    """Run both models on the data and compare them; see the module docstring for the metrics.

    `triggered` needs `target` (the label the backdoor forces); ASR counts only triggered
    inputs whose true label is not the target. `counterfactual`, `group` and `masked` are
    aligned row by row with `clean`; `group` is 0/1 per row (positive outcome = label 1).
    `masked` (`clean` with the protected attribute masked or removed, run by the original
    only) gives the floors and needs `group`; the equalized-odds gaps use `clean`'s labels.
    """
    from .detector.probe import AttentionProbe, read_calibration
    from .runtime import create_session

    if len(clean) == 0:
        raise AtPatchError("the clean set is empty; give at least one labelled input")
    if batch_size < 1:
        raise AtPatchError(f"batch size {batch_size} must be at least 1")
    if triggered is not None and target is None:
        raise AtPatchError("triggered inputs need the backdoor's target label; pass target (e.g. --target 1)")
    if target is not None and clean.label_names and not 0 <= target < len(clean.label_names):
        raise AtPatchError(f"target {target} is not a label id of this model; use 0..{len(clean.label_names) - 1}")
    if counterfactual is not None:
        _check_aligned("the counterfactual set", counterfactual, clean)
    if masked is not None:
        if group is None:
            raise AtPatchError(
                "the masked set gives the floor of the group gaps, which needs the groups; pass group (--group-field)"
            )
        _check_aligned("the masked set", masked, clean)
        if (differ := np.flatnonzero(masked.labels != clean.labels)).size:
            raise AtPatchError(
                f"the masked set's label at row {differ[0]} differs from the clean set's; it must be the clean set "
                f"with the protected attribute masked, row by row, labels kept"
            )
    if group is not None:
        group = np.asarray(group).reshape(-1)
        _check_aligned("group", group, clean)
        if not np.isin(group, (0, 1)).all() or len(np.unique(group)) < 2:
            raise AtPatchError("group must be 0/1 per clean input with both groups present; fix the group column")
    check_pair(original, patched)

    given = {"clean": clean, "triggered": triggered, "counterfactual": counterfactual}
    sets: dict[str, Dataset] = {k: v for k, v in given.items() if v is not None and len(v) > 0}
    steps = 2 * sum(-(-len(v) // batch_size) for v in sets.values())
    steps += -(-len(masked) // batch_size) if masked is not None else 0
    bar = Progress(steps, "atpatch eval", enabled=progress)
    session = create_session(original)
    probe = AttentionProbe(patched)
    runs: dict[str, dict[str, Run]] = {}
    try:
        for which, data in sets.items():
            runs[which] = {
                "original": run_original(session, data, which, batch_size, bar),
                "patched": run_patched(probe, data, which, batch_size, bar),
            }
        if masked is not None:  # the floor is the original's: the patched model need not run
            runs["masked"] = {"original": run_original(session, masked, "masked", batch_size, bar)}
    finally:
        bar.close()

    preds = {which: {m: r.logits.argmax(axis=1) for m, r in pair.items()} for which, pair in runs.items()}
    floors: dict[str, float | None] = {"parity_gap": None, "equalized_odds_gap": None}
    if masked is not None and group is not None:
        floors = group_gaps(preds["masked"]["original"], clean.labels, group)
    metrics = {}
    for model in ("original", "patched"):
        values: dict[str, float | None] = {
            "clean_accuracy": float((preds["clean"][model] == clean.labels).mean()),
        }
        if "triggered" in preds:
            assert triggered is not None and target is not None
            victims = triggered.labels != target
            # No input of another class: ASR is undefined, not 0.
            values["attack_success_rate"] = (
                float((preds["triggered"][model][victims] == target).mean()) if victims.any() else None
            )
        if "counterfactual" in preds:
            values["counterfactual_flip_rate"] = float((preds["counterfactual"][model] != preds["clean"][model]).mean())
        if group is not None:
            values.update(group_gaps(preds["clean"][model], clean.labels, group))
            for key in ("parity_gap", "equalized_odds_gap"):
                values[f"{key}_above_floor"] = above(values[key], floors[key])
        if model == "patched":
            values["flag_rate_clean"] = float(runs["clean"]["patched"].flagged.mean())
            if "triggered" in runs and triggered is not None:
                t = runs["triggered"]["patched"]
                values["flag_rate_triggered"] = float(t.flagged.mean())
                known = np.array([bool(c) for c in triggered.culprits])
                values["culprit_flag_rate"] = float(t.culprit_flagged[known].mean()) if known.any() else None
        metrics[model] = ModelMetrics(**values)  # type: ignore[arg-type]

    oracle = None
    if triggered is not None and target is not None and "triggered" in runs:
        victims = triggered.labels != target
        if victims.any() and all(triggered.culprits[i] for i in np.flatnonzero(victims)):
            known = triggered.subset(victims)
            logits = oracle_logits(original, known, runs["triggered"]["patched"].keys, batch_size)
            oracle = float((logits.argmax(axis=1) == target).mean())

    same = (runs["clean"]["original"].logits == runs["clean"]["patched"].logits).all(axis=1)
    return EvalReport(
        original=metrics["original"],
        patched=metrics["patched"],
        identical_clean=float(same.mean()),
        n_clean=len(clean),
        n_triggered=len(triggered) if triggered is not None else 0,
        n_counterfactual=len(counterfactual) if counterfactual is not None else 0,
        target=target,
        label_names=clean.label_names,
        oracle_attack_success_rate=oracle,
        parity_gap_floor=floors["parity_gap"],
        equalized_odds_gap_floor=floors["equalized_odds_gap"],
        calibration=read_calibration(patched),
        clean_length=clean.median_length(),
        predictions=preds,
        flags={which: pair["patched"].flagged for which, pair in runs.items() if which in ("clean", "triggered")},
    )

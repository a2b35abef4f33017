"""The debugging workflow behind `atpatch localize | eval | explain` (fit: fit_workflow.py).

Each job loads what the user gave (ONNX model, data files, the model's Hugging Face folder
for its tokenizer and labels), does its work, writes its output atomically, and returns the
text to print.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .culprits import write_culprits
from .data import Dataset, load_jsonl, load_npz
from .errors import AtPatchError
from .modelio import check_output_path, load_model

__all__ = [
    "check_budget",
    "check_unpatched",
    "load_data",
    "load_for",
    "run_eval",
    "run_explain",
    "run_localize",
    "with_localized_culprits",
]


def load_data(path: Path, model_dir: Path, max_len: int | None = None) -> Dataset:
    """Text (.jsonl) or images (.npz), by the file's suffix."""
    if path.suffix == ".npz":
        return load_npz(path, model_dir)
    if path.suffix in (".jsonl", ".json"):
        return load_jsonl(path, model_dir, max_len)
    raise AtPatchError(f"{path}: unknown data format {path.suffix!r}; give text as .jsonl or images as .npz")


def check_budget(budget: int) -> None:
    if budget < 1:
        raise AtPatchError(f"--budget {budget} must be at least 1 model call per input, e.g. 64 (the default)")


def check_unpatched(model: onnx.ModelProto, path: Path) -> None:
    """Localize and fit read the original model's attention: a patched one would be fitted for itself,
    and every later export refuses a detector fitted for a patched model."""
    from .detector.probe import patch_nodes

    if patch_nodes(model):
        raise AtPatchError(
            f"{path} is already patched (it has AtPatch nodes); give the original model, the one atpatch-export patched"
        )


def _check_feeds(model: onnx.ModelProto, data: Dataset, path: Path) -> None:
    """Refuse data that cannot feed the model (e.g. images for a text model) before any work."""
    initializers = {t.name for t in model.graph.initializer}
    needed = [i.name for i in model.graph.input if i.name not in initializers]
    missing = [n for n in needed if n not in data.feeds]
    if missing:
        raise AtPatchError(
            f"{path} gives {', '.join(data.feeds)} but the model takes {', '.join(needed)}; give the data the "
            f"model reads (text as .jsonl, images as .npz)"
        )


def load_for(model: onnx.ModelProto, path: Path, model_dir: Path) -> Dataset:
    data = load_data(path, model_dir)
    _check_feeds(model, data, path)
    return data


def with_localized_culprits(model, data: Dataset, budget: int) -> tuple[Dataset, list]:  # noqa: ANN001
    """`data` with every unknown culprit set filled in by localization; the localizations too."""
    from .detector.localize import localize

    unknown = [i for i, c in enumerate(data.culprits) if c is None]
    if not unknown:
        return data, []
    found = localize(
        model,
        data.subset(unknown).feeds,
        data.labels[unknown],
        None if data.tokens is None else [data.tokens[i] for i in unknown],
        budget=budget,
    )
    culprits = list(data.culprits)
    for i, result in zip(unknown, found, strict=True):
        culprits[i] = result.positions if result.restored else []
    return Dataset(data.feeds, data.labels, culprits, data.tokens, data.label_names), found


def run_localize(model_path: Path, model_dir: Path, data_path: Path, output: Path, budget: int = 64) -> str:
    check_budget(budget)
    out = check_output_path(output, model_path, data_path)
    model = load_model(model_path)
    check_unpatched(model, model_path)
    data = load_for(model, data_path, model_dir)
    blank = Dataset(data.feeds, data.labels, [None] * len(data), data.tokens, data.label_names)
    _, found = with_localized_culprits(model, blank, budget)
    write_culprits(out, found, data, data_path)
    wrong = [r for r in found if r.method != "already-correct"]
    restored = sum(r.restored for r in wrong)
    return (
        f"{len(wrong)} of {len(found)} inputs misbehave; culprits found for {restored} "
        f"(mean {np.mean([r.calls for r in wrong]) if wrong else 0:.1f} model calls each)\nwrote {out}"
    )


def run_eval(
    original_path: Path,
    patched_path: Path,
    model_dir: Path,
    clean_path: Path,
    triggered_path: Path | None = None,
    target: str | None = None,
    counterfactual_path: Path | None = None,
    group_field: str | None = None,
    json_path: Path | None = None,
    masked_path: Path | None = None,
) -> str:
    from .data import load_groups
    from .evaluate import check_pair, evaluate

    if masked_path is not None and group_field is None:
        raise AtPatchError("--masked gives the floor of the group gaps, which needs the groups; pass --group-field")
    json_out = None if json_path is None else check_output_path(json_path, original_path, patched_path, clean_path)
    original, patched = load_model(original_path), load_model(patched_path)
    check_pair(original, patched)  # before the data, which takes longer to load
    clean = load_data(clean_path, model_dir)
    triggered = load_data(triggered_path, model_dir) if triggered_path else None
    target_id = None
    if target is not None:
        target_id = int(target) if target.isdigit() else _label_index(target, clean.label_names)
    counterfactual = load_data(counterfactual_path, model_dir) if counterfactual_path else None
    group = load_groups(clean_path, group_field) if group_field else None
    masked = load_data(masked_path, model_dir) if masked_path else None
    result = evaluate(original, patched, clean, triggered, target_id, counterfactual, group, masked=masked)
    text = result.to_markdown()
    if json_out is not None:
        result.to_json(json_out)
        text += f"\nwrote {json_out}"
    return text


def _label_index(name: str, names: tuple[str, ...]) -> int:
    if name not in names:
        raise AtPatchError(f"--target {name!r} is not one of the model's labels: {', '.join(names)}")
    return names.index(name)


def run_explain(patched_path: Path, model_dir: Path, data_path: Path, index: int, output: Path) -> str:
    from .explain import check_patched, explain

    out = check_output_path(output, patched_path, data_path)
    patched = load_model(patched_path)
    check_patched(patched)  # before the data, which takes longer to load
    data = load_data(data_path, model_dir)
    if not 0 <= index < len(data):
        raise AtPatchError(f"--index {index} is out of range: {data_path} has {len(data)} inputs")
    return explain(patched, data, index, out).summary()

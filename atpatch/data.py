"""The inputs a user brings: labelled text (JSONL) or images (npz), turned into model feeds.

A `Dataset` is what evaluation and explanation run on: the model's inputs batch first, the
label each input should get, and, where known, the sequence positions that cause the
misbehaviour (a backdoor trigger, a protected-attribute word). The tokenizer and label names
come from the model's Hugging Face folder, so the feeds match what the model was trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AtPatchError

__all__ = ["Dataset", "label_names_of", "load_groups", "load_jsonl", "load_npz", "save_jsonl", "word_pieces_of"]


@dataclass(frozen=True)
class Dataset:
    feeds: dict[str, np.ndarray]  # model inputs, batch first
    labels: np.ndarray  # int64 [N]: the label the model should give
    culprits: list[list[int] | None]  # per example: positions causing the misbehaviour, None if unknown
    tokens: list[list[str]] | None  # text: token strings of the unpadded sequence; images: None
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray | list[int] | slice) -> Dataset:
        """The examples at `index` (positions, a boolean mask or a slice), padding kept as is."""
        if isinstance(index, slice):
            rows = np.arange(len(self))[index]
        else:
            rows = np.asarray(index)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = rows.astype(np.int64).reshape(-1)
        return Dataset(
            feeds={k: v[rows] for k, v in self.feeds.items()},
            labels=self.labels[rows],
            culprits=[self.culprits[i] for i in rows],
            tokens=None if self.tokens is None else [self.tokens[i] for i in rows],
            label_names=self.label_names,
        )

    def lengths(self) -> np.ndarray:
        """Unpadded sequence length per example (text); images have no padding."""
        mask = self.feeds.get("attention_mask")
        if mask is None:
            return np.full(len(self), -1, np.int64)
        return mask.sum(axis=1).astype(np.int64)

    def median_length(self) -> float:
        """The median of `lengths()`: -1.0 for images."""
        lengths = self.lengths()
        return float(np.median(lengths)) if len(lengths) and lengths[0] >= 0 else -1.0


def _config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise AtPatchError(
            f"{model_dir} has no config.json; pass the model's Hugging Face folder (from save_pretrained)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AtPatchError(f"{path} is not valid JSON ({err}); re-save the model folder with save_pretrained") from err


def label_names_of(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Label names in id order, from the config's id2label (or LABEL_i for num_labels)."""
    id2label = config.get("id2label")
    if id2label:
        try:
            by_id = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError) as err:
            raise AtPatchError(f"config.json id2label has a non-integer id ({err}); fix the model's config") from err
        if sorted(by_id) != list(range(len(by_id))):
            raise AtPatchError(f"config.json id2label ids {sorted(by_id)} are not 0..n-1; fix the model's config")
        return tuple(by_id[i] for i in range(len(by_id)))
    n = int(config.get("num_labels", 2))
    return tuple(f"LABEL_{i}" for i in range(n))


def _label_id(value: object, names: tuple[str, ...], where: str, field: str) -> int:
    allowed = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AtPatchError(f"{where}: {field!r} is {value!r}; give a label id or name ({allowed})")
    if isinstance(value, int):
        if 0 <= value < len(names):
            return value
    elif value in names:
        return names.index(value)
    elif value.strip().lstrip("-").isdigit() and 0 <= int(value) < len(names):
        return int(value)
    raise AtPatchError(f"{where}: {field} {value!r} is not one of the model's labels; use one of {allowed}")


def _spans(value: object, text: str, where: str) -> list[tuple[int, int]]:
    """A culprit: one [start, end] character span or a list of them, checked against the text."""
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
        for s in value
    ):
        raise AtPatchError(
            f"{where}: 'culprit' is {value!r}; give a character span [start, end] or a list of spans [[s, e], ...]"
        )
    spans = [(int(s), int(e)) for s, e in value]
    for s, e in spans:
        if not 0 <= s < e <= len(text):
            raise AtPatchError(
                f"{where}: culprit span [{s}, {e}] is out of range for a text of {len(text)} characters; "
                f"spans are 0 <= start < end <= len(text)"
            )
    return spans


def _tokenizer(model_dir: Path):  # noqa: ANN202 (transformers is optional at import time)
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise AtPatchError("reading text needs transformers: pip install 'atpatch[export]'") from err
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AtPatchError(
            f"cannot load a tokenizer from {model_dir} ({first}); save it there with tokenizer.save_pretrained, "
            "or, for an image model, give its data as .npz (pixel_values, labels)"
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise AtPatchError(
            f"the tokenizer in {model_dir} is not a fast tokenizer, "
            "so culprit spans cannot be mapped to tokens; "
            f"save a fast one (tokenizer.json) with PreTrainedTokenizerFast.save_pretrained"
        )
    return tokenizer


def word_pieces_of(model_dir: str | Path) -> np.ndarray | None:
    """The tokenizer's table of word-continuing token ids (ops/words.py), or None when it has none."""
    from .ops.words import continuation_table

    tokenizer = _tokenizer(Path(model_dir))
    return continuation_table(tokenizer.get_vocab(), set(tokenizer.all_special_ids))


def _read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise AtPatchError(f"{path} does not exist or is not a file; pass a JSONL file with one example per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AtPatchError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be decoded); re-save it as UTF-8 JSONL"
        ) from err
    records = []
    # "\n" only: JSON strings may hold raw U+2028 and the like, which str.splitlines would split on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines, e.g. a trailing newline, are not examples
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise AtPatchError(
                f"{path} line {number}: invalid JSON ({err.msg} at column {err.colno}); "
                f'each line must be one object like {{"text": "...", "label": 0}}'
            ) from err
        if not isinstance(record, dict):
            raise AtPatchError(f'{path} line {number}: expected a JSON object like {{"text": "...", "label": 0}}')
        records.append((number, record))
    if not records:
        raise AtPatchError(f'{path} has no examples; write one JSON object per line: {{"text": "...", "label": 0}}')
    return records


def load_jsonl(path: str | Path, model_dir: str | Path, max_len: int | None = None) -> Dataset:
    """Read labelled texts and tokenize them with the tokenizer in `model_dir`.

    Each line: {"text": str, "label": id or name, "expected"?: id or name,
    "culprit"?: [start, end] or [[start, end], ...]} (character spans of the text).
    The label the model should give is "expected" when present, else "label". Sequences are
    padded to the longest one, truncated at `max_len` (default: the tokenizer's limit).
    """
    path, model_dir = Path(path), Path(model_dir)
    names = label_names_of(_config(model_dir))
    records = _read_records(path)
    tokenizer = _tokenizer(model_dir)
    limit = max_len if max_len is not None else tokenizer.model_max_length
    if limit is None or limit > 100_000:  # "no limit" is stored as a huge integer
        limit = 512
    if limit < 2:
        raise AtPatchError(f"max_len {limit} is too short for any text; use at least 2 (e.g. 128)")

    texts, labels, spans = [], [], []
    for number, record in records:
        where = f"{path} line {number}"
        text = record.get("text")
        if not isinstance(text, str):
            missing = "has no 'text'" if text is None else f"has 'text' of type {type(text).__name__}"
            raise AtPatchError(f'{where} {missing}; each line needs "text": a string')
        if "expected" in record:
            labels.append(_label_id(record["expected"], names, where, "expected"))
        elif "label" in record:
            labels.append(_label_id(record["label"], names, where, "label"))
        else:
            raise AtPatchError(f'{where} has no "label"; add "label": one of {list(names)} (or its id)')
        culprit = record.get("culprit")
        spans.append(None if culprit is None else _spans(culprit, text, where))
        texts.append(text)

    enc = tokenizer(texts, truncation=True, max_length=limit, return_offsets_mapping=True)
    ids_list: list[list[int]] = enc["input_ids"]
    longest = max(len(ids) for ids in ids_list)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(texts), longest), pad_id, np.int64)
    mask = np.zeros((len(texts), longest), np.int64)
    # Models exported elsewhere may also take token_type_ids; evaluation feeds each model only
    # the inputs it declares, so carrying them costs nothing.
    type_ids = np.zeros_like(input_ids) if "token_type_ids" in enc else None
    tokens: list[list[str]] = []
    culprits: list[list[int] | None] = []
    for i, ids in enumerate(ids_list):
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        if type_ids is not None:
            type_ids[i, : len(ids)] = enc["token_type_ids"][i]
        tokens.append(tokenizer.convert_ids_to_tokens(ids))
        example_spans = spans[i]
        if example_spans is None:
            culprits.append(None)
            continue
        offsets = enc["offset_mapping"][i]
        # A token belongs to the culprit when its characters overlap a span; special tokens
        # have the empty offset (0, 0) and never do. A span cut off by truncation gives [].
        culprits.append(
            [p for p, (s, e) in enumerate(offsets) if e > s and any(s < ce and cs < e for cs, ce in example_spans)]
        )
    feeds = {"input_ids": input_ids, "attention_mask": mask}
    if type_ids is not None:
        feeds["token_type_ids"] = type_ids
    return Dataset(
        feeds=feeds,
        labels=np.asarray(labels, np.int64),
        culprits=culprits,
        tokens=tokens,
        label_names=names,
    )


def load_groups(path: str | Path, field: str = "group") -> np.ndarray:
    """The 0/1 `field` of every example in a JSONL file (e.g. the protected attribute), int64 [N],
    aligned with `load_jsonl` of the same file; for the demographic-parity gap."""
    path = Path(path)
    values = []
    for number, record in _read_records(path):
        value = record.get(field)
        if isinstance(value, bool):
            value = int(value)
        if value not in (0, 1) or not isinstance(value, int):
            shown = "missing" if field not in record else repr(value)
            raise AtPatchError(f'{path} line {number}: "{field}" is {shown}; give 0 or 1 on every line')
        values.append(value)
    return np.asarray(values, np.int64)


def _special_tokens(config: Mapping[str, Any]) -> int:
    """Key positions before a vision encoder's patches: [CLS], and DeiT's distillation token."""
    return 2 if config.get("model_type") == "deit" else 1


def load_npz(path: str | Path, model_dir: str | Path) -> Dataset:
    """Read images: an .npz with pixel_values [N, C, H, W] float32, labels [N] and optionally
    culprit_patches [N, P] bool (patch p is key position lead + p, after the model's special tokens:
    [CLS], and DeiT's distillation token)."""
    path, model_dir = Path(path), Path(model_dir)
    config = _config(model_dir)
    names = label_names_of(config)
    if not path.is_file():
        raise AtPatchError(f"{path} does not exist or is not a file; pass an .npz with pixel_values and labels")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AtPatchError(
            f"{path} is not a readable .npz of plain arrays ({first}); "
            "save it with np.savez(pixel_values=..., labels=...)"
        ) from err
    missing = [k for k in ("pixel_values", "labels") if k not in arrays]
    if missing:
        raise AtPatchError(
            f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(arrays)) or 'nothing'}); "
            f"save it with np.savez(path, pixel_values=[N, C, H, W] float32, labels=[N] int)"
        )
    pixels, labels = arrays["pixel_values"], arrays["labels"]
    channels = int(config.get("num_channels", pixels.shape[1] if pixels.ndim == 4 else 3))
    size = config.get("image_size")
    if pixels.ndim != 4 or pixels.shape[1] != channels or (size is not None and pixels.shape[2:] != (size, size)):
        want = f"[N, {channels}, {size}, {size}]" if size is not None else f"[N, {channels}, H, W]"
        raise AtPatchError(
            f"{path}: pixel_values has shape {pixels.shape}, the model needs {want}; resize/normalise first"
        )
    if not np.issubdtype(pixels.dtype, np.floating):
        raise AtPatchError(
            f"{path}: pixel_values is {pixels.dtype}; give normalised float32 values (as the image processor does)"
        )
    n = pixels.shape[0]
    if n == 0:
        raise AtPatchError(f"{path} has no images; pixel_values must have at least one row")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise AtPatchError(f"{path}: labels has shape {labels.shape} and type {labels.dtype}; give {n} integer labels")
    bad = labels[(labels < 0) | (labels >= len(names))]
    if bad.size:
        allowed = ", ".join(f"{i}={name!r}" for i, name in enumerate(names))
        raise AtPatchError(f"{path}: label {int(bad[0])} is not one of the model's labels; use one of {allowed}")
    culprits: list[list[int] | None] = [None] * n
    if "culprit_patches" in arrays:
        patches = arrays["culprit_patches"]
        patch = config.get("patch_size")
        expected_p = (pixels.shape[2] // patch) * (pixels.shape[3] // patch) if patch else patches.shape[-1]
        if patches.dtype != bool or patches.shape != (n, expected_p):
            raise AtPatchError(
                f"{path}: culprit_patches has shape {patches.shape} and type {patches.dtype}; "
                f"give a bool array [{n}, {expected_p}] (one entry per image patch)"
            )
        lead = _special_tokens(config)
        culprits = [[lead + int(p) for p in np.flatnonzero(row)] for row in patches]
    return Dataset(
        feeds={"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)},
        labels=labels.astype(np.int64),
        culprits=culprits,
        tokens=None,
        label_names=names,
    )


def save_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write examples (dicts with "text", "label", ...) as JSONL, atomically."""
    from .modelio import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path

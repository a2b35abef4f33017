"""The culprits file: what `atpatch localize` writes and `atpatch fit --culprits` reads.

One JSON object per misbehaving input, in the data file's order: its index, the culprit
positions found (sequence positions, as the attention maps' key axis), their tokens (text),
whether removing them restored the expected label, how, at what cost, and the evidence. Each
row names the data file it was computed on (a hash of its bytes), so culprits are never paired
with another file's inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .data import Dataset
from .detector.localize import Localization
from .errors import AtPatchError
from .modelio import atomic_output

__all__ = ["file_digest", "protected_culprits", "read_culprits", "write_culprits"]

_FIELDS = {"data", "index", "positions", "restored"}


def file_digest(path: Path) -> str:
    """A short hash of a data file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def write_culprits(out: Path, found: Sequence[Localization], data: Dataset, data_path: Path) -> None:
    digest = file_digest(data_path)
    with atomic_output(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in found:
            row = {
                "data": digest,
                "index": r.index,
                "positions": r.positions,
                "tokens": [data.tokens[r.index][p] for p in r.positions] if data.tokens else None,
                "restored": r.restored,
                "method": r.method,
                "calls": r.calls,
                "evidence": r.evidence,
            }
            f.write(json.dumps(row) + "\n")


def _is_position_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in value)


def read_culprits(path: Path, data_path: Path, data: Dataset) -> Dataset:
    """`data` (loaded from `data_path`) with the culprits localize wrote for it; an input whose
    culprits were not found (not restored) gets none."""
    again = f"run atpatch localize --data {data_path} -o {path}"
    if not path.is_file():
        raise AtPatchError(f"--culprits {path} does not exist; {again}")
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AtPatchError(f"--culprits {path} is not atpatch localize's output ({err}); {again}") from err
    digest = file_digest(data_path)
    culprits: list[list[int] | None] = [None] * len(data)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.keys() >= _FIELDS or not _is_position_list(row["positions"]):
            raise AtPatchError(f"--culprits {path} row {number} is not a row localize writes; {again}")
        if row["data"] != digest:
            raise AtPatchError(f"--culprits {path} was written for another data file than {data_path}; {again}")
        index = row["index"]
        if not isinstance(index, int) or not 0 <= index < len(data) or culprits[index] is not None:
            raise AtPatchError(f"--culprits {path} row {number} has a bad or repeated index {index!r}; {again}")
        culprits[index] = list(row["positions"]) if row["restored"] else []
    if any(c is None for c in culprits):
        raise AtPatchError(f"--culprits {path} covers {len(rows)} of the {len(data)} inputs; {again}")
    return replace(data, culprits=culprits)


def protected_culprits(data: Dataset, tokens: Sequence[str], data_path: Path) -> Dataset:
    """`data` with each input's culprits set to the positions of the given token strings (e.g. a protected
    attribute: "he", "she"); a byte-level BPE token matches with or without its leading-space mark."""
    if data.tokens is None:
        raise AtPatchError(f"--protected-tokens needs text: {data_path} holds images; give culprit_patches instead")
    wanted = {t for t in tokens if t}
    if not wanted:
        raise AtPatchError("--protected-tokens is empty; give the attribute's tokens, e.g. --protected-tokens he,she")
    culprits: list[list[int] | None] = [
        [p for p, tok in enumerate(row) if tok in wanted or tok.lstrip("\u0120\u2581") in wanted] for row in data.tokens
    ]
    if not any(culprits):
        raise AtPatchError(
            f"none of --protected-tokens {','.join(sorted(wanted))} is a token of any input in {data_path}; give "
            f"them as the tokenizer writes them (e.g. lower-case)"
        )
    return replace(data, culprits=culprits)

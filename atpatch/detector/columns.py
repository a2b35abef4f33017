"""The key columns of a set of inputs, as the detector sees them: per layer, each column's features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..ops.joint import patch_grid
from ..ops.reference import attended_columns, column_features
from ..progress import Progress
from .probe import AttentionProbe

__all__ = ["ColumnSet", "beside_culprits", "collect_columns"]


@dataclass
class ColumnSet:
    """Per layer: the features of every unmasked key column, which input it came from, and its label."""

    features: list[np.ndarray]  # per layer [n_columns, FEATURES_PER_HEAD * heads]
    example: np.ndarray  # [n_columns] index of the input it belongs to
    positive: np.ndarray  # [n_columns] bool: a culprit column
    position: np.ndarray  # [n_columns] its key position in that input

    def subset(self, keep: np.ndarray) -> ColumnSet:
        """The columns where `keep` [n_columns] is True."""
        return ColumnSet([f[keep] for f in self.features], self.example[keep], self.positive[keep], self.position[keep])

    def followed_by(self, other: ColumnSet, other_offset: int) -> ColumnSet:
        """Both sets in one; `other`'s input indices shifted by `other_offset` to stay distinct."""
        return ColumnSet(
            [np.concatenate(pair) for pair in zip(self.features, other.features, strict=True)],
            np.concatenate([self.example, other.example + other_offset]),
            np.concatenate([self.positive, other.positive]),
            np.concatenate([self.position, other.position]),
        )


def collect_columns(
    probe: AttentionProbe,
    feeds: dict[str, np.ndarray],
    culprits: Sequence[Sequence[int] | None] | None = None,
    batch_size: int = 64,
    desc: str = "",
) -> ColumnSet:
    """Features of every unmasked key column of every input, batch by batch (maps are not kept);
    `desc` labels a progress bar (progress.py)."""
    per_layer: list[list[np.ndarray]] = [[] for _ in range(probe.num_layers)]
    example, positive, position = [], [], []
    total = len(next(iter(feeds.values())))
    with Progress(total, desc, unit="input", enabled=bool(desc)) as bar:
        for part, out in probe.iter_batches(feeds, batch_size):
            valid = attended_columns(out.before[0])  # [B, K]: a column some real query attends to
            for layer, m in enumerate(out.before):
                per_layer[layer].append(column_features(m)[valid])
            rows, cols = np.nonzero(valid)
            example.append(rows + part.start)
            position.append(cols)
            flags = np.zeros(valid.shape, dtype=bool)
            for r in range(valid.shape[0]):
                given = culprits[part.start + r] if culprits is not None else None
                for p in given or ():
                    if p < valid.shape[1]:
                        flags[r, p] = True
            positive.append(flags[rows, cols])
            bar.step(n=part.stop - part.start)
    return ColumnSet(
        [np.concatenate(f) for f in per_layer],
        np.concatenate(example),
        np.concatenate(positive),
        np.concatenate(position),
    )


def beside_culprits(columns: ColumnSet, inputs: Sequence[int]) -> np.ndarray:
    """bool [n_columns]: the columns of `inputs` that are not culprits but touch one of its culprit patches
    on the patch grid (its 3 x 3 block; the grid as ops/joint.py reads it from the key positions).

    Localization returns a 1-minimal set: the fewest patches whose masking restores the label. A trigger
    straddling four patches is often undone by masking the one holding most of it, and the other three
    are then neither found nor benign: taken as negatives, they teach the detector that trigger
    patches are normal."""
    lead, side = patch_grid(int(columns.position.max(initial=0)) + 1)
    chosen = np.isin(columns.example, np.asarray(inputs, dtype=np.int64))
    n_inputs = int(columns.example.max(initial=-1)) + 1
    culprit = np.zeros((n_inputs, side + 2, side + 2), bool)  # padded by one on every side
    hit = chosen & columns.positive & (columns.position >= lead)
    rows, cols = np.divmod(columns.position[hit] - lead, side)
    culprit[columns.example[hit], rows + 1, cols + 1] = True
    near = np.zeros_like(culprit)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near[:, 1:-1, 1:-1] |= culprit[:, 1 + dr : side + 1 + dr, 1 + dc : side + 1 + dc]
    on_grid = chosen & ~columns.positive & (columns.position >= lead)
    out = np.zeros(len(columns.example), bool)
    r, c = np.divmod(columns.position[on_grid] - lead, side)
    out[on_grid] = near[columns.example[on_grid], r + 1, c + 1]
    return out

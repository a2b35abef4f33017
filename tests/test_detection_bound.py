"""benchmarks/detection_bound.py's neighbour features, against a direct loop over each column's neighbours."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from benchmark_runs import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from detection_bound import with_context  # noqa: E402


def _expected(dense: np.ndarray, b: int, j: int, grid: bool) -> tuple[np.ndarray, np.ndarray]:
    """Max and mean of the attended neighbours of column j of input b, by a plain loop."""
    keys = dense.shape[1]
    if grid:
        side = int(np.sqrt(keys))
        lead = keys - side * side
        r, c = divmod(j - lead, side)
        near = [
            lead + (r + dy) * side + c + dx
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dy or dx) and 0 <= r + dy < side and 0 <= c + dx < side
        ]
    else:
        near = [k for k in (j - 1, j + 1) if 0 <= k < keys]
    seen = [dense[b, k] for k in near if np.isfinite(dense[b, k]).all()]
    if not seen:
        return np.zeros(dense.shape[2]), np.zeros(dense.shape[2])
    return np.max(seen, 0), np.mean(seen, 0)


@pytest.mark.parametrize(("grid", "keys"), [(True, 17), (True, 26), (False, 9)], ids=["cls+4x4", "lead1+5x5", "seq"])
def test_each_column_gets_the_max_and_mean_of_its_attended_neighbours(grid: bool, keys: int) -> None:
    rng = np.random.default_rng(7)
    n, d = 5, 3
    lead = keys - int(np.sqrt(keys)) ** 2 if grid else 1
    attended = rng.random((n, keys)) < 0.7  # some columns unattended: they are no one's neighbour
    attended[:, :lead] = False
    attended[-1] = False
    attended[-1, lead] = True  # an input with one attended column: no neighbours, zeros
    attended[:, -1] = False  # the grid comes from `keys`, not from the last attended column
    example, position = np.nonzero(attended)
    feats = rng.normal(size=(len(example), d)).astype(np.float32)
    dense = np.full((n, keys, d), np.nan)
    dense[example, position] = feats
    out = with_context(feats, example, position, keys, grid)
    assert out.shape == (len(example), 3 * d)
    np.testing.assert_array_equal(out[:, :d], feats)
    for i, (b, j) in enumerate(zip(example, position, strict=True)):
        peak, mean = _expected(dense, b, j, grid)
        np.testing.assert_allclose(out[i, d : 2 * d], peak, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[i, 2 * d :], mean, rtol=1e-6, atol=1e-6)

"""Finding the culprit positions of a misbehaving input, without being told them.

For an input the model gets wrong, find a small set of input positions (tokens, or image
patches) whose removal restores the expected label. Attention guides the search: positions
whose key column soaks up the most attention are tried first, growing the set one at a
time; the set found is then shrunk by delta debugging (ddmin) to a 1-minimal one. When the
guided search fails, an image's 2 x 2 blocks of patches are tried one by one (a trigger
straddling patches that attention does not single out), then ddmin runs over every removable
position. A removed token is deleted; a removed patch is filled with the image's background
(per channel, the median of its border pixels). Every model call counts against a budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..ops.joint import patch_grid
from ..ops.reference import column_features
from ..progress import Progress
from .probe import AttentionProbe

__all__ = ["Localization", "localize"]

_SPECIAL_TOKENS = {"<s>", "</s>", "<pad>", "<|endoftext|>"}


@dataclass(frozen=True)
class Localization:
    index: int  # the example's index in its dataset
    positions: list[int]  # culprit positions found (sequence positions, as in the maps' key axis)
    restored: bool  # removing `positions` makes the model give the expected label
    calls: int  # model calls spent
    method: str  # "guided", "window" (images), "ddmin", "already-correct", "not-restorable" or "budget-exhausted"
    evidence: dict[str, object] = field(default_factory=dict)


class _BudgetExhausted(Exception):
    pass


class _Tester:
    """Runs the model on one input with some positions removed; counts calls against the budget."""

    def __init__(self, probe: AttentionProbe, feeds: dict[str, np.ndarray], expected: int, budget: int,
                 keys: int) -> None:  # fmt: skip
        self.probe, self.feeds, self.expected, self.budget = probe, feeds, expected, budget
        self.calls = 0
        self.is_image = "pixel_values" in feeds
        # An image's keys: `lead` special tokens ([CLS]; DeiT's distillation token too), then the patches.
        self.lead, self.grid = patch_grid(keys) if self.is_image else (0, 0)
        self.probs: dict[tuple[int, ...], np.ndarray] = {}  # removed positions -> class probabilities

    def removed(self, positions: Sequence[int]) -> dict[str, np.ndarray]:
        if self.is_image:
            return {"pixel_values": _mask_patches(self.feeds["pixel_values"], positions, self.lead, self.grid)}
        drop = set(positions)
        out = {}
        for name, value in self.feeds.items():
            keep = [i for i in range(value.shape[1]) if i not in drop]
            row = np.zeros_like(value)  # deleted tokens leave padding (id 0, mask 0) at the end
            row[:, : len(keep)] = value[:, keep]
            out[name] = row
        return out

    def restores(self, positions: Sequence[int]) -> bool:
        key = tuple(sorted(int(p) for p in positions))
        if key not in self.probs:
            if self.calls >= self.budget:
                raise _BudgetExhausted
            self.calls += 1
            logits = self.probe.session.run([self.probe.model_outputs[0]], self.probe.model_feeds(self.removed(key)))[
                0
            ][0]
            self.probs[key] = _softmax(logits)
        return int(np.argmax(self.probs[key])) == self.expected


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _mask_patches(pixels: np.ndarray, positions: Sequence[int], lead: int, grid: int) -> np.ndarray:
    """`pixels` [1, C, H, W] with each patch at key `positions` (patch p at lead + p) filled with the
    image's background: per channel, the median of its border pixels."""
    out = pixels.copy()
    size = out.shape[-1] // grid
    image = pixels[0]
    border = np.concatenate([image[:, 0, :], image[:, -1, :], image[:, :, 0], image[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None]
    for pos in positions:
        row, col = divmod(pos - lead, grid)
        out[0, :, row * size : (row + 1) * size, col * size : (col + 1) * size] = background
    return out


def _ddmin(candidates: list[int], test: Callable[[Sequence[int]], bool]) -> list[int]:
    """A 1-minimal subset of `candidates` whose removal still restores (given that all of them do)."""
    s, n = list(candidates), 2
    while len(s) >= 2:
        chunks = [list(c) for c in np.array_split(s, n) if len(c)]
        for chunk in chunks:
            if test(chunk):
                s, n = chunk, 2
                break
        else:
            for chunk in chunks:
                rest = [p for p in s if p not in chunk]
                if len(chunks) > 2 and test(rest):
                    s, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(s):
                    break
                n = min(len(s), 2 * n)
    return [int(p) for p in s]


def _restoring_window(tester: _Tester, anomaly: np.ndarray) -> list[int] | None:
    """The first 2 x 2 block of patches, most attended first, whose masking restores the label; None if none.

    A trigger that straddles patches, none of them singled out by attention, is missed by the guided
    search, and masking every patch at once rarely restores an image's label (it leaves no image):
    each block is one model call, 36 for a 7 x 7 grid."""
    g = tester.grid
    blocks = [
        [tester.lead + (r + dr) * g + c + dc for dr in (0, 1) for dc in (0, 1)]
        for r in range(g - 1)
        for c in range(g - 1)
    ]
    for block in sorted(blocks, key=lambda b: -float(anomaly[b].sum())):
        if tester.restores(block):
            return block
    return None


def _anomaly(before: list[np.ndarray]) -> np.ndarray:
    """Per key position of one input: the largest attention mass it gets in any head of any layer."""
    return np.max([column_features(m)[0, :, : m.shape[1]].max(axis=-1) for m in before], axis=0)


def _removable(feeds: dict[str, np.ndarray], tokens: list[str] | None, length: int) -> list[int]:
    if "pixel_values" in feeds:
        return list(range(patch_grid(length)[0], length))
    valid = int(feeds["attention_mask"][0].sum()) if "attention_mask" in feeds else length
    special = (
        set()
        if tokens is None
        else {i for i, t in enumerate(tokens) if (t.startswith("[") and t.endswith("]")) or t in _SPECIAL_TOKENS}
    )
    return [i for i in range(valid) if i not in special]


def localize(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    expected: np.ndarray,
    tokens: list[list[str]] | None = None,
    *,
    budget: int = 64,
    max_guided: int = 6,
    probe: AttentionProbe | None = None,
    progress: bool = True,
) -> list[Localization]:
    """Localize the culprits of each input in `feeds` (batch first) against its `expected` label
    (`progress`: a bar on a terminal's stderr, progress.py)."""
    probe = probe or AttentionProbe(model)
    results, found = [], 0
    with Progress(len(expected), "localize", unit="input", enabled=progress) as bar:
        for i in range(len(expected)):
            one = {k: v[i : i + 1] for k, v in feeds.items()}
            result = _localize_one(probe, one, i, int(expected[i]), tokens[i] if tokens else None, budget, max_guided)
            results.append(result)
            found += result.restored and result.method != "already-correct"
            bar.step(f"culprits found for {found}")
    return results


def _localize_one(probe: AttentionProbe, one: dict[str, np.ndarray], i: int, expected: int,
                  tokens: list[str] | None, budget: int, max_guided: int) -> Localization:  # fmt: skip
    """Input `i` (`one`, a batch of 1): the smallest set of positions whose removal restores `expected`."""
    run = probe.run(one)
    length = run.before[0].shape[-1]
    tester = _Tester(probe, one, expected, budget, length)
    evidence: dict[str, object] = {"predicted": int(np.argmax(run.outputs[0][0]))}
    if evidence["predicted"] == expected:
        return Localization(i, [], True, 0, "already-correct", evidence)
    anomaly = _anomaly(run.before)
    candidates = sorted(_removable(one, tokens, length), key=lambda p: -anomaly[p])
    positions, method, restored = [], "budget-exhausted", False
    try:
        for k in range(1, min(max_guided, len(candidates)) + 1):
            if tester.restores(candidates[:k]):
                positions, method, restored = _ddmin(candidates[:k], tester.restores), "guided", True
                break
        else:
            window = _restoring_window(tester, anomaly) if tester.is_image else None
            if window is not None:
                positions, method, restored = _ddmin(window, tester.restores), "window", True
            elif candidates and tester.restores(candidates):
                positions, method, restored = _ddmin(candidates, tester.restores), "ddmin", True
            else:
                method = "not-restorable"
    except _BudgetExhausted:
        pass
    evidence["attention_anomaly"] = {int(p): round(float(anomaly[p]), 4) for p in positions}
    if restored:
        after = tester.probs[tuple(sorted(positions))]
        evidence["expected_probability_after_removal"] = round(float(after[expected]), 4)
    return Localization(i, sorted(positions), restored, tester.calls, method, evidence)

"""Localizing a trigger that straddles image patches, and fitting from what localization found.

Measured on a held-out ViT case (`python benchmarks/vision_backdoor.py --trigger 2,18 --pattern square
--size 5 --target Bag`: a white 5x5 square over four patches, seed 0): before these three pieces,
localization restored the label for 14 of the first 60 debugging images and the localized detector
left 40.7% ASR (known positions: 2.1%); with them, 58 of 60 and 6.9%.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from atpatch.data import load_npz
from atpatch.detector.columns import ColumnSet, beside_culprits
from atpatch.detector.localize import _mask_patches, _removable, _restoring_window, _Tester
from atpatch.detector.probe import AttentionProbe


def test_a_masked_patch_takes_the_images_background_per_channel(rng: np.random.Generator) -> None:
    """Mid-grey left a 4-patch grey block where the trigger was, which the backdoored model may read as
    the trigger (masking the true patches grey restored 72.5% of the held-out case's debugging images,
    with the border's median 92%)."""
    pixels = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    pixels[0, 1] += 4.0  # channels with different backgrounds
    out = _mask_patches(pixels, [1, 4], lead=1, grid=2)  # patches (0, 0) and (1, 1) of 4x4 pixels
    image = pixels[0]
    border = np.concatenate([image[:, 0, :], image[:, -1, :], image[:, :, 0], image[:, :, -1]], axis=1)
    background = np.median(border, axis=1)
    for channel in range(3):
        assert (out[0, channel, :4, :4] == background[channel]).all()
        assert (out[0, channel, 4:, 4:] == background[channel]).all()
    np.testing.assert_array_equal(out[0, :, :4, 4:], pixels[0, :, :4, 4:])
    np.testing.assert_array_equal(out[0, :, 4:, :4], pixels[0, :, 4:, :4])
    assert (pixels[0, 1] > 2.0).mean() > 0.9  # the input was not written to


def test_the_window_scan_finds_a_trigger_over_four_patches_attention_does_not_single_out() -> None:
    """A 4 x 4 grid (positions 1..16 after [CLS]); the label comes back only when the patches at grid
    (1, 1), (1, 2), (2, 1) and (2, 2) (positions 6, 7, 10, 11) are all masked."""
    trigger = {6, 7, 10, 11}
    calls: list[list[int]] = []

    def restores(block: list[int]) -> bool:
        calls.append(block)
        return trigger <= set(block)

    tester = SimpleNamespace(lead=1, grid=4, restores=restores)
    anomaly = np.zeros(17)
    anomaly[[1, 2, 5, 16]] = 1.0  # attention points elsewhere: those blocks are tried first
    assert sorted(_restoring_window(tester, anomaly)) == sorted(trigger)
    assert set(calls[0]) == {1, 2, 5, 6} and len(calls) <= 9 and len({tuple(c) for c in calls}) == len(calls)

    calls.clear()
    assert (
        _restoring_window(SimpleNamespace(lead=1, grid=4, restores=lambda b: calls.append(b) and False), anomaly)
        is None
    )
    assert len(calls) == 9  # every 2 x 2 block of a 4 x 4 grid, once


def test_the_neighbours_of_a_localized_patch_are_left_out_of_the_negatives() -> None:
    """Two inputs on a 4 x 4 grid after one [CLS] (17 keys); input 0's culprit (localized) at grid
    (0, 0), input 1's (given) at grid (2, 2). Only input 0's touching patches are marked."""
    keys = 17
    example = np.repeat([0, 1], keys)
    position = np.tile(np.arange(keys), 2)
    positive = np.zeros(2 * keys, bool)
    positive[1] = True  # input 0, grid (0, 0)
    positive[keys + 1 + 2 * 4 + 2] = True  # input 1, grid (2, 2)
    columns = ColumnSet([np.zeros((2 * keys, 1), np.float32)], example, positive, position)
    marked = beside_culprits(columns, [0])
    assert sorted(position[marked & (example == 0)].tolist()) == [2, 5, 6]  # grid (0, 1), (1, 0), (1, 1)
    assert not marked[example == 1].any() and not marked[positive].any() and not marked[position == 0].any()

    # Given for both inputs: input 1's 3 x 3 block around (2, 2) too, wrapping at no edge.
    marked = beside_culprits(columns, [0, 1])
    block = [1 + r * 4 + c for r in (1, 2, 3) for c in (1, 2, 3) if (r, c) != (2, 2)]
    assert sorted(position[marked & (example == 1)].tolist()) == block
    kept = columns.subset(~marked)
    assert len(kept.example) == 2 * keys - 3 - 8 and kept.positive.sum() == 2


def test_deit_patches_sit_after_its_two_special_tokens(exported, hf_folder: Callable[[str], Path], tmp_path: Path,
                                                       rng: np.random.Generator) -> None:  # fmt: skip
    """DeiT puts a distillation token after [CLS]: key position 2 is its first patch. Read as one special
    token, localization masked the patch before the one it meant, and a culprit_patches file marked the
    wrong position."""
    probe = AttentionProbe(exported("deit", False, 17).model)
    pixels = rng.normal(size=(1, 3, 16, 16)).astype(np.float32)  # 4 x 4 patches of 4 x 4 pixels
    keys = probe.run({"pixel_values": pixels}).before[0].shape[-1]
    tester = _Tester(probe, {"pixel_values": pixels}, expected=0, budget=8, keys=keys)
    assert (keys, tester.lead, tester.grid) == (18, 2, 4)
    assert _removable({"pixel_values": pixels}, None, keys) == list(range(2, 18))

    masked = tester.removed([2 + 4 + 1])["pixel_values"]  # the patch at grid (1, 1)
    changed = (masked != pixels).any(axis=1)[0]
    assert changed[4:8, 4:8].all() and changed.sum() == 16

    window = _restoring_window(SimpleNamespace(lead=2, grid=4, restores=lambda b: 17 in b), np.zeros(keys))
    assert sorted(window) == [12, 13, 16, 17]  # the last 2 x 2 block: grid (2..3, 2..3)

    np.savez(tmp_path / "d.npz", pixel_values=pixels, labels=np.array([1]),
             culprit_patches=np.eye(16, dtype=bool)[[5]])  # fmt: skip
    assert load_npz(tmp_path / "d.npz", hf_folder("deit")).culprits == [[2 + 5]]
    assert load_npz(tmp_path / "d.npz", hf_folder("vit")).culprits == [[1 + 5]]

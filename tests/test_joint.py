"""The joint rule (ops/joint.py): one score over all layers, in numpy and in the patched graph."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from torch_reference import assert_matches_torch, forward, patched_softmax

from atpatch.detector.probe import AttentionProbe, read_detector
from atpatch.ops import reference, spec
from atpatch.ops.joint import JointRule, joint_flags, joint_scores
from atpatch.ops.weights import Detector
from atpatch.rewrite import patch_model
from atpatch.runtime import native

pytest.importorskip("transformers")
NATIVE = [False, True] if native.library_path() is not None else [False]


def _mass_detector(heads: int) -> reference.LayerDetector:
    """score = the column's attention mass summed over heads; never flags on its own."""
    w1 = np.zeros((spec.num_features(heads), 1), np.float32)
    w1[:heads, 0] = 1.0
    zero, one = np.zeros(1, np.float32), np.ones(1, np.float32)
    return reference.LayerDetector(w1, zero, one, zero, 1e30)


def test_pooling_takes_each_positions_best_window_on_a_sequence() -> None:
    s0 = np.array([[0.0, 4.0, 0.0, 1.0, 3.0]], np.float32)
    s1 = np.array([[9.0, 2.0, 2.0, 1.0, -np.inf]], np.float32)  # the last position unattended
    rule = JointRule((1.0, 0.5), threshold=2.5, window=2)
    # total 4.5, 5, 1, 1.5, -inf; windows 4.75, 3, 1.25, -inf; position 0 never the rule's
    got = joint_scores([s0, s1], rule, grid=False)
    np.testing.assert_array_equal(got, [[-np.inf, 4.75, 3.0, 1.25, -np.inf]])
    np.testing.assert_array_equal(joint_flags([s0, s1], rule, grid=False), [[False, True, True, False, False]])
    single = joint_scores([s0, s1], replace(rule, window=1), grid=False)
    np.testing.assert_array_equal(single, [[-np.inf, 5.0, 1.0, 1.5, -np.inf]])


def test_a_layer_left_out_neither_counts_nor_turns_unattended_columns_into_nan() -> None:
    s0 = np.array([[1.0, -np.inf, 3.0]], np.float32)
    s1 = np.array([[50.0, 50.0, -np.inf]], np.float32)
    got = joint_scores([s0, s1], JointRule((2.0, 0.0), threshold=0.0), grid=False)
    np.testing.assert_array_equal(got, [[-np.inf, -np.inf, 6.0]])


def test_pooling_follows_the_patch_grid_after_the_special_positions() -> None:
    # [CLS] then a 3 x 3 grid; one hot patch at row 1, column 2.
    x = np.zeros((1, 10), np.float32)
    x[0, 0] = 100.0
    x[0, 1 + 1 * 3 + 2] = 8.0
    got = joint_scores([x], JointRule((1.0,), threshold=1.9, window=2), grid=True)[0]
    assert got[0] == -np.inf  # [CLS]
    grid = got[1:].reshape(3, 3)
    # Every 2 x 2 window holding the hot patch averages to 2; the others hold 0.
    np.testing.assert_array_equal(grid, [[0, 2, 2], [0, 2, 2], [0, 2, 2]])


def test_rule_and_detector_file_refuse_what_they_cannot_use(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="not all 0"):
        JointRule((0.0, 0.0), 1.0)
    with pytest.raises(ValueError, match="window"):
        JointRule((1.0,), 1.0, window=3)
    with pytest.raises(ValueError, match="2 weights for 1 layers"):
        Detector((_mass_detector(2),), joint=JointRule((1.0, 1.0), 1.0))
    detector = Detector((_mass_detector(2), _mass_detector(2)), joint=JointRule((1.0, 0.25), 3.5, 2))
    detector.save(tmp_path / "d.safetensors")
    assert Detector.load(tmp_path / "d.safetensors").joint == detector.joint


def _lead(scores: np.ndarray) -> float:
    """How far the largest joint score is above the next distinct one (0 when there is none)."""
    values = np.unique(scores[np.isfinite(scores)])[::-1]
    return float(values[0] - values[1]) if len(values) > 1 else 0.0


def _threshold_flagging_few(scores: np.ndarray) -> float:
    """A threshold between the largest joint score and the next distinct one below it."""
    values = np.unique(scores[np.isfinite(scores)])[::-1]
    assert len(values) > 1 and values[0] - values[1] > 1e-3
    return float((values[0] + values[1]) / 2)


@pytest.mark.parametrize("use_native", NATIVE, ids=lambda n: "kernel" if n else "function")
def test_the_patched_graph_flags_what_the_numpy_rule_flags_and_patches_it_everywhere(
    exported, rng: np.random.Generator, use_native: bool
) -> None:  # noqa: ANN001
    """No layer flags on its own; the joint rule (window 2) flags positions of one input, which are then
    patched in both layers, as the torch model patched at those positions computes; others keep their outputs."""
    from atpatch.exporter.hf import load_hf_model

    result = exported("bert", False, 17)
    model = load_hf_model(result.folder)
    layers = (_mass_detector(4), _mass_detector(4))
    rule = JointRule((1.0, 0.5), 0.0, window=2)
    for _ in range(10):  # inputs drawn again while the top joint score leads by 1e-3 or less (2 draws in 1000)
        inputs = result.family.make_inputs(result.config, 4, 12, rng)
        seen: list[np.ndarray] = []
        with patched_softmax(layers, seen):
            original = forward(model, inputs)
        scores = [reference.scores_output(m, d) for m, d in zip(seen, layers, strict=True)]
        joint = joint_scores(scores, rule, grid=False)
        if _lead(joint) > 1e-3:
            break
    rule = replace(rule, threshold=_threshold_flagging_few(joint))
    expected = joint_flags(scores, rule, grid=False)
    assert expected.any(axis=1).sum() == 1

    patched, _ = patch_model(result.model, Detector(layers, joint=rule))
    assert read_detector(patched).joint == rule
    out = AttentionProbe(patched, use_native=use_native).run(inputs)
    np.testing.assert_array_equal(out.union, expected)
    np.testing.assert_array_equal(out.joint, expected)  # the probe reads the rule's own flags
    assert not any(f.any() for f in out.flagged)
    np.testing.assert_array_equal(out.second_pass, expected.any(axis=1))
    with patched_softmax(layers, forced=expected):
        fixed = forward(model, inputs)
    assert_matches_torch(out.outputs[0], fixed)
    clean = ~expected.any(axis=1)
    np.testing.assert_allclose(out.outputs[0][clean], original[clean], atol=1e-5, rtol=0)


def test_on_an_image_the_graph_pools_over_the_patch_grid(exported, rng: np.random.Generator) -> None:  # noqa: ANN001
    result = exported("vit", False, 17)
    pixels = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    layers = (_mass_detector(4), _mass_detector(4))
    plain = AttentionProbe(patch_model(result.model, Detector(layers), cross_layer=False)[0])
    scores = [
        reference.scores_output(m, d) for m, d in zip(plain.run({"pixel_values": pixels}).before, layers, strict=True)
    ]
    rule = JointRule((0.5, 1.0), 0.0, window=2)
    rule = replace(rule, threshold=_threshold_flagging_few(joint_scores(scores, rule, grid=True)))
    expected = joint_flags(scores, rule, grid=True)
    assert expected.any() and not expected[:, 0].any()
    out = AttentionProbe(patch_model(result.model, Detector(layers, joint=rule))[0]).run({"pixel_values": pixels})
    np.testing.assert_array_equal(out.union, expected)

"""Cross-layer patching: a position flagged in any layer is patched in every layer (rewrite/crosslayer.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from torch_reference import assert_matches_torch, cross_layer_forward, forward, patched_softmax

from atpatch.detector.probe import AttentionProbe
from atpatch.ops import reference, spec
from atpatch.ops.weights import Detector
from atpatch.rewrite import patch_model, unpatch_model
from atpatch.rewrite.crosslayer import FORCED_INPUT, SECOND_PASS

pytest.importorskip("transformers")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _mass_detector(heads: int, threshold: float) -> reference.LayerDetector:
    """score = the column's attention mass summed over heads."""
    w1 = np.zeros((spec.num_features(heads), 1), np.float32)
    w1[:heads, 0] = 1.0
    zero, one = np.zeros(1, np.float32), np.ones(1, np.float32)
    return reference.LayerDetector(w1, zero, one, zero, threshold)


def _for_pass2_alone(patched: onnx.ModelProto) -> set[str]:
    """Values computed outside the second pass's If that nothing but its pass-2 branch reads."""
    (node,) = [n for n in patched.graph.node if n.name == SECOND_PASS]
    branches = {a.name: a.g for a in node.attribute}
    made = {o for n in patched.graph.node for o in n.output}
    read = {i for n in patched.graph.node for i in n.input} | {o.name for o in patched.graph.output}
    read |= {i for n in branches["else_branch"].node for i in n.input}
    return {i for n in branches["then_branch"].node for i in n.input if i in made and i not in read}


def test_an_unflagged_input_runs_four_glue_nodes_whatever_the_layers(bert, exported) -> None:  # noqa: ANN001
    """An encoder's union of flags, its widening and the effect check's positions are built inside
    pass 2's branch, which alone reads them: outside it, cross-layer patching adds only "is anything
    flagged" (Concat, Cast, ReduceMax, Greater) before the If. An Or per layer, two reductions and the
    widening outside it cost 1-1.5% of a small ViT's or tabular BERT's time at batch 1
    (benchmarks/latency.py's models)."""
    from atpatch.ops.joint import Confirm, JointRule
    from atpatch.rewrite.crosslayer import ROWS, UNION

    result, _ = bert
    detector = replace(Detector.pass_through([4, 4]), spread=1)
    patched, _ = patch_model(result.model, detector)
    per_layer, _ = patch_model(result.model, detector, cross_layer=False)
    before = {n.name for n in per_layer.graph.node}
    added = [n for n in patched.graph.node if n.name not in before and n.op_type != "Constant"]
    assert sorted(n.op_type for n in added) == ["Cast", "Concat", "Greater", "If", "ReduceMax"], added
    (node,) = [n for n in patched.graph.node if n.name == SECOND_PASS]
    then_branch = next(a.g for a in node.attribute if a.name == "then_branch")
    assert {UNION, ROWS} <= {o for n in then_branch.node for o in n.output}
    assert not _for_pass2_alone(patched)
    # With the joint rule and the effect check's two windows, on an image model.
    vit = exported("vit", False, 17).model
    joint = JointRule((0.5, 1.0), 1.0, 2)
    check = Confirm(0, 1.0, (0.5, 1.0), window=2, blocks=2)
    checked = replace(Detector.pass_through([4, 4]), spread=1, joint=joint, confirm=check)
    patched_vit = patch_model(vit, checked)[0]
    assert not _for_pass2_alone(patched_vit)
    # The joint rule and the check share the grid's shape and the weighted sum of the layers' scores.
    ops = [n.op_type for n in patched_vit.graph.node if n.name.startswith("atpatch/")]
    assert (ops.count("Shape"), ops.count("Sqrt"), ops.count("Mul")) == (1, 1, 3), ops


@pytest.fixture(scope="module")
def bert(exported):  # noqa: ANN001, ANN201
    from atpatch.exporter.hf import load_hf_model

    result = exported("bert", False, 17)
    return result, load_hf_model(result.folder)


def _late_only_case(model, draw: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], Detector]:  # noqa: ANN001
    """Inputs from `draw` and a detector for them: layer 0 never flags; layer 1 flags the most-attended
    column of exactly one input. Inputs are drawn again while that column's score is within 1e-3 of the
    next one's (onnxruntime's maps and PyTorch's could then disagree on which is flagged): 1 draw in
    1500 at batch 3 x 10 tokens."""
    never = _mass_detector(4, 1e30)
    for _ in range(10):
        inputs = draw()
        seen: list[np.ndarray] = []
        with patched_softmax([never, never], seen):
            forward(model, inputs)
        scores = np.sort(reference.column_scores(seen[1], never).ravel())[::-1]
        if scores[0] - scores[1] > 1e-3:
            return inputs, Detector((never, _mass_detector(4, float((scores[0] + scores[1]) / 2))), kind="test")
    raise AssertionError("10 draws without a clearly most-attended column")


def test_a_position_flagged_in_a_late_layer_is_patched_in_every_layer(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    result, model = bert
    inputs, detector = _late_only_case(model, lambda: result.family.make_inputs(result.config, 4, 12, rng))
    patched, _ = patch_model(result.model, detector)
    onnx.checker.check_model(patched, full_check=True)

    expected, union = cross_layer_forward(model, inputs, detector.layers)
    assert union.any(axis=1).sum() == 1
    (got,) = _session(patched).run(None, inputs)
    assert_matches_torch(got, expected)
    with patched_softmax(detector.layers):
        per_layer = forward(model, inputs)
    flagged_row = int(np.flatnonzero(union.any(axis=1))[0])
    assert np.abs(got[flagged_row] - per_layer[flagged_row]).max() > 1e-4, "layer 0 must be patched too"
    (original,) = _session(result.model).run(None, inputs)
    for row in range(len(got)):
        if row != flagged_row:  # in the same batch as a flagged input, the others keep their exact outputs
            assert np.array_equal(got[row], original[row])


def test_the_second_pass_shares_the_weights_instead_of_copying_them(bert) -> None:  # noqa: ANN001
    result, model = bert
    patched, _ = patch_model(result.model, Detector.pass_through([4, 4]))
    (node,) = [n for n in patched.graph.node if n.name == SECOND_PASS]
    then_branch = next(a.g for a in node.attribute if a.name == "then_branch")
    assert len(then_branch.initializer) == 0
    # Its own constants are the shape computations' (shape_only.py), never a weight.
    held = [a.t for n in then_branch.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    assert held and all(np.prod(t.dims) <= 64 for t in held), [list(t.dims) for t in held]
    assert sum(n.domain == spec.DOMAIN for n in then_branch.node) == 2  # both layers run again
    # What the second pass adds over per-layer patching (the op's function and the detectors are in both):
    # a copy of the weights would add them all again.
    weights = sum(t.ByteSize() for t in result.model.graph.initializer)
    per_layer, _ = patch_model(result.model, Detector.pass_through([4, 4]), cross_layer=False)
    added = patched.ByteSize() - per_layer.ByteSize()
    assert added < 0.5 * weights, f"the second pass added {added} bytes for {weights} bytes of weights"


def test_padding_changes_neither_flags_nor_outputs(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    """The same inputs, padded to different lengths, get the same flags and the same logits."""
    result, model = bert
    lengths = np.array([5, 9, 7, 11])

    def padded(ids: np.ndarray, width: int) -> dict[str, np.ndarray]:
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        full = np.zeros((4, width), np.int64)
        full[:, :11] = ids
        return {"input_ids": full * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}

    # A detector that flags something in these inputs, in layer 1 only.
    inputs, detector = _late_only_case(
        model, lambda: padded(rng.integers(5, result.config.vocab_size, size=(4, 11)).astype(np.int64), 11)
    )
    ids = inputs["input_ids"]
    probe = AttentionProbe(patch_model(result.model, detector)[0])
    runs = {width: probe.run(padded(ids, width)) for width in (11, 12, 16, 31)}
    base = runs[11]
    assert base.union.any()
    for width, out in runs.items():
        np.testing.assert_array_equal(out.union[:, :11], base.union, err_msg=f"flags padded to {width}")
        assert not out.union[:, 11:].any()
        np.testing.assert_allclose(out.outputs[0], base.outputs[0], atol=1e-5, rtol=0, err_msg=f"padded to {width}")


def test_forced_input_patches_given_positions_in_every_layer(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    result, model = bert
    inputs = result.family.make_inputs(result.config, 3, 10, rng)
    forced = np.zeros((3, 10), bool)
    forced[0, 3] = forced[2, [1, 4]] = True
    patched, _ = patch_model(result.model, Detector.pass_through([4, 4]), forced_input=True)
    (got,) = _session(patched).run(None, {**inputs, FORCED_INPUT: forced})
    never = _mass_detector(4, 1e30)
    with patched_softmax([never, never], forced=forced):
        expected = forward(model, inputs)
    assert_matches_torch(got, expected)
    (original,) = _session(result.model).run(None, inputs)
    assert np.array_equal(got[1], original[1]) and np.abs(got[0] - original[0]).max() > 1e-4


def test_unpatching_gives_back_the_original_outputs(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    result, model = bert
    inputs, detector = _late_only_case(model, lambda: result.family.make_inputs(result.config, 4, 12, rng))
    patched, _ = patch_model(result.model, detector)
    plain = unpatch_model(patched)
    assert not any(n.domain == spec.DOMAIN or n.op_type == "If" for n in plain.graph.node)
    assert [i.name for i in plain.graph.input] == [i.name for i in result.model.graph.input]
    np.testing.assert_array_equal(_session(plain).run(None, inputs)[0], _session(result.model).run(None, inputs)[0])


def test_the_probe_reports_flags_per_layer_and_patches_in_every_layer(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    result, model = bert
    inputs, detector = _late_only_case(model, lambda: result.family.make_inputs(result.config, 4, 12, rng))
    out = AttentionProbe(patch_model(result.model, detector)[0]).run(inputs)
    row = int(np.flatnonzero(out.second_pass)[0])
    assert not out.flagged[0].any() and out.flagged[1][row].any()
    for layer in range(2):  # the flagged position is patched in both layers of that input's second pass,
        # with whatever the layer's detector flags itself in the second pass's map (layer 0 never flags; layer 1's
        # map changes once layer 0 is patched, so its tight threshold may pass another column there)
        own = reference.flag_columns(out.before[layer][row : row + 1], detector.layers[layer])[0]
        assert np.array_equal(out.patched[layer][row], out.union[row] | own)
        assert not np.array_equal(out.before[layer][row], out.after[layer][row])
    assert np.array_equal(out.patched[0][row], out.union[row])
    (expected, _) = cross_layer_forward(model, inputs, detector.layers)
    assert_matches_torch(out.outputs[0], expected)


def test_spread_patches_the_neighbours_of_a_flagged_position(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    """With spread 2, the second pass patches every position within 2 of a flagged one, in every layer."""

    result, model = bert
    inputs, detector = _late_only_case(model, lambda: result.family.make_inputs(result.config, 4, 12, rng))
    detector = replace(detector, spread=2)
    out = AttentionProbe(patch_model(result.model, detector)[0]).run(inputs)
    row = int(np.flatnonzero(out.second_pass)[0])
    (flagged,) = np.flatnonzero(out.flagged[1][row])
    widened = np.zeros(12, bool)
    widened[max(0, flagged - 2) : flagged + 3] = True
    assert np.array_equal(out.union[row], widened)
    assert np.array_equal(out.patched[0][row], widened)
    forced = np.zeros((4, 12), bool)
    forced[row] = widened
    never = _mass_detector(4, 1e30)
    with patched_softmax([never, detector.layers[1]], forced=forced):
        expected = forward(model, inputs)
    assert_matches_torch(out.outputs[0][row], expected[row])


def test_spread_on_an_image_follows_the_patch_grid(exported, rng: np.random.Generator) -> None:  # noqa: ANN001
    """A ViT's 16 patches form a 4 x 4 grid after [CLS]: spread 1 patches the 3 x 3 block around a flagged patch."""

    result = exported("vit", False, 17)
    plain = AttentionProbe(patch_model(result.model, Detector.pass_through([4, 4]), cross_layer=False)[0])
    # Layer 1 is to flag one patch: the most-attended column, drawn again while that is [CLS] (which has no
    # place on the grid) or leads the next column by 1e-3 or less (3.4% and 0.1% of 1000 draws).
    for _ in range(10):
        pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
        scores = reference.column_scores(plain.run({"pixel_values": pixels}).before[1], _mass_detector(4, 0.0))
        top = np.sort(scores.ravel())[::-1]
        if scores[:, 0].max() < top[0] and top[0] - top[1] > 1e-3:
            break
    else:
        raise AssertionError("10 draws without a clearly most-attended patch")
    detector = Detector((_mass_detector(4, 1e30), _mass_detector(4, float((top[0] + top[1]) / 2))), spread=1)
    out = AttentionProbe(patch_model(result.model, detector)[0]).run({"pixel_values": pixels})
    row = int(np.flatnonzero(out.second_pass)[0])
    (position,) = np.flatnonzero(out.flagged[1][row])
    r, c = divmod(position - 1, 4)
    block = np.zeros((4, 4), bool)
    block[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2] = True
    assert np.array_equal(out.union[row], np.concatenate([[False], block.ravel()]))


def test_a_clean_map_is_patched_in_place_in_every_layer(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    """onnxruntime gives the kernel the softmax's buffer (MayInplace) only for an output whose shape it
    can tell is the same: the patched file names each map's dims, and pass 2 computes its own first map,
    so that a clean input's maps are not copied."""
    from atpatch.runtime import create_session, native

    library = native.library_path()
    if library is None:
        pytest.skip("native kernel not built: run scripts/install.sh")
    result, _ = bert
    inputs = result.family.make_inputs(result.config, 3, 10, rng)
    (original,) = _session(result.model).run(None, inputs)
    for cross_layer in (True, False):
        patched, _ = patch_model(result.model, Detector.pass_through([4, 4]), cross_layer=cross_layer)
        session = create_session(patched, use_native=True)
        before = native.compute_counts(library)
        (got,) = session.run(None, inputs)
        computes, in_place = (a - b for a, b in zip(native.compute_counts(library), before, strict=True))
        assert (computes, in_place) == (2, 2), f"cross_layer={cross_layer}: {in_place} of {computes} maps in place"
        np.testing.assert_array_equal(got, original)


def test_a_flagged_inputs_second_pass_patches_its_maps_in_place(bert, rng: np.random.Generator) -> None:  # noqa: ANN001
    """Pass 2's maps are declared with pass 1's shapes, so that onnxruntime gives the kernel their
    buffers too: a flagged input's two passes patch every map in place, and match the function."""
    from atpatch.runtime import create_session, native

    library = native.library_path()
    if library is None:
        pytest.skip("native kernel not built: run scripts/install.sh")
    result, model = bert
    inputs, detector = _late_only_case(model, lambda: result.family.make_inputs(result.config, 3, 10, rng))
    patched, _ = patch_model(result.model, detector)
    session = create_session(patched, use_native=True)
    before = native.compute_counts(library)
    (got,) = session.run(None, inputs)
    computes, in_place = (a - b for a, b in zip(native.compute_counts(library), before, strict=True))
    assert (computes, in_place) == (4, 4), f"{in_place} of {computes} maps in place (2 layers, 2 passes)"
    (original,) = _session(result.model).run(None, inputs)
    (function,) = create_session(patched, use_native=False).run(None, inputs)
    assert not np.allclose(got, original)  # the second pass ran and changed the flagged input
    np.testing.assert_allclose(got, function, rtol=0, atol=1e-5)


def test_onnxruntime_simplifies_pass_one_as_it_does_a_per_layer_model(bert, tmp_path) -> None:  # noqa: ANN001
    """onnxruntime merges duplicate shape computations (the Unsqueeze and Concat building each
    Reshape's target) only where no subgraph reads them: pass 2 computes its own, so pass 1 keeps
    no more of them than the per-layer model does (on a small ViT, 24 more had cost 13% at batch 1)."""
    from collections import Counter

    result, _ = bert
    counts = {}
    for cross_layer in (True, False):
        patched, _ = patch_model(result.model, Detector.pass_through([4, 4]), cross_layer=cross_layer)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp_path / f"optimized-{cross_layer}.onnx")
        ort.InferenceSession(patched.SerializeToString(), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        shape_nodes = [n for n in graph.node if not n.name.startswith("atpatch/")]  # not the union's Concat
        counts[cross_layer] = Counter(n.op_type for n in shape_nodes if n.op_type in ("Unsqueeze", "Concat", "Gather"))
    assert counts[True] == counts[False]

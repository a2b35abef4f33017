"""The numpy reference itself keeps the promises of ops/spec.py."""

from __future__ import annotations

import numpy as np
import pytest
from maps import MASKS, random_detector, random_map, with_flags

from atpatch.ops import reference


@pytest.mark.parametrize("mask", MASKS)
def test_patched_rows_sum_to_one_and_masked_entries_stay_zero(mask: str, rng: np.random.Generator) -> None:
    for _ in range(20):
        a = random_map(rng, (2, 3, 7, 9), mask)
        det = with_flags(a, random_detector(rng, a.shape[1]), "some", rng)
        if det is None:
            continue
        out, _ = reference.atpatch(a, det)
        np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)
        assert np.all(out[a == 0] == 0)
        assert np.all(out >= 0)


def test_flagged_entries_get_the_smallest_unflagged_value_and_the_rest_keep_their_proportions() -> None:
    a = np.array([[[[0.1, 0.7, 0.2, 0.0]]]], dtype=np.float32)
    out = reference.patch_columns(a, np.array([[False, True, False, False]]))
    # The flagged key takes the row's smallest unflagged value (0.1), then the row is renormalised:
    # 0.1, 0.1, 0.2 over a total of 0.4.
    np.testing.assert_allclose(out, [[[[0.25, 0.25, 0.5, 0.0]]]], rtol=1e-6)


def test_no_flag_returns_the_input_bit_for_bit(rng: np.random.Generator) -> None:
    a = random_map(rng, (2, 4, 5, 5), "causal")
    out = reference.patch_columns(a, np.zeros((2, 5), dtype=bool))
    assert out.dtype == a.dtype and np.array_equal(out, a)


def test_a_row_whose_every_unmasked_entry_is_flagged_is_left_unchanged() -> None:
    a = np.array([[[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]], dtype=np.float32)
    out = reference.patch_columns(a, np.array([[True, True, False]]))
    assert np.array_equal(out[0, 0, 0], a[0, 0, 0])  # nothing unflagged to take the mass
    np.testing.assert_allclose(out[0, 0, 1], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)  # each flagged one gets 0.5


def test_features_do_not_grow_with_sequence_length() -> None:
    for k in (4, 64, 512):
        uniform = np.full((1, 2, k, k), 1.0 / k, dtype=np.float32)
        f = reference.column_features(uniform)  # [1, k, 3 features x 2 heads]
        # A uniform map gives every column exactly its share: mass 1, peak 1/k, every row ties at top.
        np.testing.assert_allclose(f[0, :, 0:2], 1.0, rtol=1e-5)
        np.testing.assert_allclose(f[0, :, 2:4], 1.0 / k, rtol=1e-5)
        np.testing.assert_allclose(f[0, :, 4:6], 1.0)
        np.testing.assert_allclose(f[0, :, 6:12], 1.0, rtol=1e-5)  # each token attends uniformly


def test_a_column_that_soaks_up_attention_stands_out_in_its_features() -> None:
    k = 10
    a = np.full((1, 1, k, k), 0.02, dtype=np.float32)
    a[..., 3] = 1 - 0.02 * (k - 1)
    f = reference.column_features(a)[0]  # one head: mass, peak, top
    assert f[3, 0] > 5 * f[0, 0] and f[3, 2] == 1.0 and f[0, 2] == 0.0


def test_features_are_laid_out_feature_major_then_head() -> None:
    a = np.full((1, 2, 4, 4), 0.25, dtype=np.float32)
    a[0, 1, :, 2] = 0.7  # head 1 over-attends to key 2
    a[0, 1, :, [0, 1, 3]] = 0.1
    f = reference.column_features(a)[0, 2]
    # mass, peak, top, then key 2's own row (row 2): self, opeak, ofocus; each head 0 then head 1.
    expected = [1.0, 2.8, 0.25, 0.7, 1.0, 1.0, 1.0, 2.8, 1.0, 2.8, 1.0, (0.49 + 3 * 0.01) * 4]
    np.testing.assert_allclose(f, expected, rtol=1e-6)


def test_a_detector_for_another_head_count_is_refused(rng: np.random.Generator) -> None:
    a = random_map(rng, (1, 4, 5, 5), "none")
    with pytest.raises(ValueError, match="expects 12 features per column"):
        reference.column_scores(a, random_detector(rng, heads=2))


def test_fp16_maps_are_patched_in_float32_and_returned_as_fp16(rng: np.random.Generator) -> None:
    a = random_map(rng, (1, 2, 6, 6), "none")
    flags = np.zeros((1, 6), dtype=bool)
    flags[0, 2] = True
    out16 = reference.patch_columns(a.astype(np.float16), flags)
    assert out16.dtype == np.float16
    np.testing.assert_allclose(out16, reference.patch_columns(a, flags), atol=2e-3)


def test_a_bert_padding_query_is_not_a_real_query_but_a_decoder_step_is() -> None:
    a = np.zeros((1, 1, 4, 4), np.float32)
    a[0, 0, :, :3] = 1 / 3  # three real keys; query 3 is padding and still attends to them
    assert reference.real_queries(a).tolist() == [[[True, True, True, False]]]
    step = np.full((1, 1, 1, 5), 0.2, np.float32)  # one new token after 4 cached: its own key is the last
    assert reference.real_queries(step).tolist() == [[[True]]]
    cross = np.full((1, 1, 3, 2), 0.5, np.float32)  # more queries than keys: row 0 has no own key
    cross[0, 0, 1:, 1] = 0.0  # rows 1 and 2 sit at keys 0 and 1; key 1 is masked in row 2
    cross[0, 0, 1:, 0] = 1.0
    assert reference.real_queries(cross).tolist() == [[[True, True, False]]]


def test_features_ignore_padding_queries() -> None:
    real = np.array([[[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]]], np.float32)
    padded = np.zeros((1, 1, 5, 5), np.float32)
    padded[..., :3, :3] = real
    padded[..., 3:, :3] = [0.05, 0.05, 0.9]  # padding queries piling onto key 2
    np.testing.assert_allclose(reference.column_features(padded)[:, :3], reference.column_features(real), rtol=1e-6)
    assert not reference.attended_columns(padded)[0, 3:].any()


def test_forced_positions_broadcast_and_are_not_reported_as_flags(rng: np.random.Generator) -> None:
    a = random_map(rng, (3, 2, 5, 5), "none")
    det = with_flags(a, random_detector(rng, a.shape[1]), "none", rng)
    assert det is not None
    forced = np.array([[False, True, False, False, False]])
    out, flags = reference.atpatch(a, det, forced)  # [1, K] broadcasts over the batch
    assert not flags.any()
    assert np.array_equal(out, reference.patch_columns(a, np.repeat(forced, 3, axis=0)))


def test_own_row_features_sit_on_each_query_s_own_key() -> None:
    """Two new tokens after two cached ones: keys 2 and 3 get rows 0 and 1's features, keys 0 and 1 none."""
    a = np.array([[[[0.1, 0.2, 0.7, 0.0], [0.25, 0.25, 0.25, 0.25]]]], np.float32)
    f = reference.column_features(a)[0]  # one head: mass, peak, top, self, opeak, ofocus
    np.testing.assert_allclose(f[:2, 3:], 0.0)
    np.testing.assert_allclose(f[2, 3:], [0.7 * 3, 0.7 * 3, (0.01 + 0.04 + 0.49) * 3], rtol=1e-6)
    np.testing.assert_allclose(f[3, 3:], [1.0, 1.0, 1.0], rtol=1e-6)

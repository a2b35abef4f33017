"""The detector file: safetensors + JSON metadata, round-trips, and refuses what is not one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atpatch.detector import Detector
from atpatch.errors import DetectorMismatchError
from atpatch.ops import reference, spec
from atpatch.ops.weights import Calibration


def test_a_saved_detector_loads_back_equal(tmp_path: Path, rng: np.random.Generator) -> None:
    layers = tuple(
        reference.LayerDetector(
            rng.normal(size=(spec.num_features(2), 5)).astype(np.float32),
            rng.normal(size=5).astype(np.float32),
            rng.normal(size=5).astype(np.float32),
            rng.normal(size=1).astype(np.float32),
            float(rng.normal()),
        )
        for _ in range(3)
    )
    promise = Calibration(0.005, 2400, 27.5)
    detector = Detector(layers=layers, kind="fitted", model_fingerprint="abcd", calibration=promise)
    detector.save(tmp_path / "d.safetensors")
    loaded = Detector.load(tmp_path / "d.safetensors")
    assert loaded.kind == "fitted" and loaded.model_fingerprint == "abcd" and loaded.num_layers == 3
    assert loaded.calibration == promise
    for a, b in zip(layers, loaded.layers, strict=True):
        for p in ("w1", "b1", "w2", "b2"):
            assert np.array_equal(getattr(a, p), getattr(b, p))
        assert np.float32(a.threshold) == np.float32(b.threshold)


def test_a_file_that_is_not_a_detector_is_refused_in_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(DetectorMismatchError, match="not a readable safetensors detector") as err:
        Detector.load(bogus)
    assert "\n" not in str(err.value)


def test_wrong_weight_shapes_are_refused_with_the_expected_shapes() -> None:
    bad = reference.LayerDetector(
        np.zeros((spec.FEATURES_PER_HEAD + 1, 2), np.float32),  # not a whole number of heads
        np.zeros(2, np.float32),
        np.zeros(2, np.float32),
        np.zeros(1, np.float32),
        0.0,
    )
    with pytest.raises(ValueError, match=rf"w1 \[{spec.FEATURES_PER_HEAD} \* heads, hidden\]"):
        Detector(layers=(bad,))

"""Detector weights for every attention layer of one model, and their file format.

They are the AtPatch op's parameters, so they live with the op: the rewrite (which puts them
into the graph) and the detector package (which fits them) both use them without importing
each other.

The file is safetensors (tensors `layer{i}.w1|b1|w2|b2`, and `words.continues` for whole words)
with the JSON description in its metadata header: no pickle, readable from any language.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DetectorMismatchError
from . import spec
from .joint import Confirm, JointRule
from .reference import LayerDetector

__all__ = ["Calibration", "Detector", "FORMAT_VERSION", "read_confirm"]

FORMAT_VERSION = 1
_PARAMS = ("w1", "b1", "w2", "b2")
_WORD_PIECES = "words.continues"  # the word_pieces table, uint8


@dataclass(frozen=True)
class Calibration:
    """What the thresholds promise: at most `flag_rate` of clean inputs flagged (with 90% confidence), on
    inputs like its `inputs` calibration inputs, whose median length was `length` tokens (-1: images,
    all of one length). `atpatch eval` names it when clean inputs are flagged more often."""

    flag_rate: float
    inputs: int
    length: float

    def describe(self) -> dict[str, float | int]:
        return {"flag_rate": self.flag_rate, "inputs": self.inputs, "length": self.length}

    @classmethod
    def read(cls, record: dict | None) -> Calibration | None:
        if record is None:
            return None
        return cls(float(record["flag_rate"]), int(record["inputs"]), float(record["length"]))


@dataclass(frozen=True)
class Detector:
    """One `LayerDetector` per attention layer, in graph order, plus what it was fitted for."""

    layers: tuple[LayerDetector, ...]
    kind: str = "fitted"
    model_fingerprint: str | None = None
    feature_version: int = spec.FEATURE_VERSION
    # Positions around each flagged one that cross-layer patching patches too (along the sequence,
    # or on an image's patch grid): a trigger spanning several positions may be flagged at one.
    spread: int = 0
    # One score over all layers (ops/joint.py), flagging besides each layer's own threshold; None: off.
    joint: JointRule | None = None
    # The effect check (ops/joint.py, Confirm): the best position of an unflagged input sent to the
    # misbehaving class is patched, and kept where the class changes; None: off.
    confirm: Confirm | None = None
    # uint8 [vocab]: per token id, whether it starts a word, continues one or is a special token
    # (ops/words.py); cross-layer patching then widens flags to whole words. None: off (images, and
    # tokenizers that mark neither word starts nor continuations).
    word_pieces: np.ndarray | None = field(default=None, compare=False, repr=False)
    calibration: Calibration | None = None  # None: not recorded (fitted before, or by the fairness sweep)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a detector needs at least one layer")
        for i, layer in enumerate(self.layers):
            hidden = np.shape(layer.b1)[0] if np.ndim(layer.b1) == 1 else -1
            shapes = {p: np.shape(getattr(layer, p)) for p in _PARAMS}
            rows = shapes["w1"][0] if len(shapes["w1"]) == 2 else -1
            expected = {"w1": (rows, hidden), "b1": (hidden,), "w2": (hidden,), "b2": (1,)}
            if hidden < 1 or shapes != expected or rows < 1 or rows % spec.FEATURES_PER_HEAD:
                raise ValueError(
                    f"detector layer {i} has weight shapes {shapes}; expected w1 "
                    f"[{spec.FEATURES_PER_HEAD} * heads, hidden], b1 [hidden], w2 [hidden], b2 [1]"
                )
        for name, rule in (("the joint rule", self.joint), ("the effect check", self.confirm)):
            if rule is not None and len(rule.weights) != len(self.layers):
                raise ValueError(f"{name} has {len(rule.weights)} weights for {len(self.layers)} layers")
        if self.word_pieces is not None and (np.ndim(self.word_pieces) != 1 or np.size(self.word_pieces) == 0):
            shape = np.shape(self.word_pieces)
            raise ValueError(f"word_pieces must be a 1-D table over the vocabulary, got shape {shape}")
        if not isinstance(self.spread, int) or self.spread < 0:
            raise ValueError(f"spread must be a whole number of positions >= 0, got {self.spread!r}")
        if self.feature_version != spec.FEATURE_VERSION:
            raise DetectorMismatchError(
                f"detector uses column features v{self.feature_version}, this atpatch computes "
                f"v{spec.FEATURE_VERSION}; refit the detector with this atpatch version"
            )

    @classmethod
    def pass_through(cls, heads: Sequence[int]) -> Detector:
        """A detector that never flags a column (layers with these head counts): outputs stay the original's."""
        zero = np.zeros(1, np.float32)
        layers = tuple(
            LayerDetector(
                w1=np.zeros((spec.num_features(h), 1), np.float32),
                b1=zero,
                w2=zero,
                b2=np.full(1, -1.0, np.float32),
                threshold=0.0,
            )
            for h in heads
        )
        return cls(layers=layers, kind="pass-through")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def heads(self) -> list[int]:
        """The attention heads each layer's detector was built for."""
        return [layer.w1.shape[0] // spec.FEATURES_PER_HEAD for layer in self.layers]

    def describe(self) -> dict[str, object]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "feature_version": self.feature_version,
            "num_layers": self.num_layers,
            "thresholds": [float(layer.threshold) for layer in self.layers],
            "model_fingerprint": self.model_fingerprint,
            "spread": self.spread,
            "whole_words": self.word_pieces is not None,
            "joint": None
            if self.joint is None
            else {
                "weights": [float(w) for w in self.joint.weights],
                "threshold": float(self.joint.threshold),
                "window": self.joint.window,
            },
            "confirm": None
            if self.confirm is None
            else {
                "label": self.confirm.label,
                "threshold": float(self.confirm.threshold),
                "weights": [float(w) for w in self.confirm.weights],
                "window": self.confirm.window,
                "drop": float(self.confirm.drop),
                "blocks": self.confirm.blocks,
            },
            "calibration": None if self.calibration is None else self.calibration.describe(),
        }

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {
            f"layer{i}.{p}": np.ascontiguousarray(getattr(layer, p), dtype=np.float32)
            for i, layer in enumerate(self.layers)
            for p in _PARAMS
        }
        if self.word_pieces is not None:
            tensors[_WORD_PIECES] = np.asarray(self.word_pieces, dtype=np.uint8)
        save_file(tensors, str(path), metadata={"atpatch_detector": json.dumps(self.describe())})

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise DetectorMismatchError(f"detector file {path} does not exist; pass the file written by atpatch fit")
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = (f.metadata() or {}).get("atpatch_detector")
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except (SafetensorError, OSError, ValueError) as err:
            raise DetectorMismatchError(
                f"{path} is not a readable safetensors detector file ({err}); pass the file written by atpatch fit"
            ) from err
        if header is None:
            raise DetectorMismatchError(
                f"{path} has no atpatch_detector metadata; it is not an atpatch detector (use atpatch fit)"
            )
        try:
            meta = json.loads(header)
            joint = meta.get("joint")
            layers = tuple(
                LayerDetector(
                    **{p: tensors[f"layer{i}.{p}"].astype(np.float32) for p in _PARAMS},
                    threshold=float(meta["thresholds"][i]),
                )
                for i in range(int(meta["num_layers"]))
            )
            return cls(
                layers=layers,
                kind=str(meta.get("kind", "fitted")),
                model_fingerprint=meta.get("model_fingerprint"),
                feature_version=int(meta["feature_version"]),
                spread=int(meta.get("spread", 0)),
                calibration=Calibration.read(meta.get("calibration")),
                confirm=read_confirm(meta.get("confirm")),
                word_pieces=tensors[_WORD_PIECES].astype(np.uint8) if _WORD_PIECES in tensors else None,
                joint=None
                if joint is None
                else JointRule(
                    tuple(float(w) for w in joint["weights"]), float(joint["threshold"]), int(joint["window"])
                ),
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise DetectorMismatchError(
                f"{path} is a damaged detector file ({err!r}); refit it with atpatch fit"
            ) from err


def read_confirm(record: dict | None) -> Confirm | None:
    """The effect check from its description (Detector.describe()["confirm"]); None: off."""
    if record is None:
        return None
    weights = tuple(float(w) for w in record["weights"])
    # Files from before the drop and the second window: any change counts, one window.
    drop, blocks = float(record.get("drop", 0.0)), int(record.get("blocks", 1))
    return Confirm(int(record["label"]), float(record["threshold"]), weights, int(record["window"]), drop, blocks)

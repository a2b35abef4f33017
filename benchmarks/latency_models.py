"""The models benchmarks/latency.py times, exported once with random weights and cached by shape.

BERT-base is what a text server runs; the 4-layer ViT and the 2-layer tabular BERT have the
shapes of the vision and fairness cases' models (benchmarks/vision_data.py, fairness.py), the
small models edge devices run, where the op's fixed costs weigh most.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BENCHES", "Bench"]

Feeds = Callable[[int, int, np.random.Generator], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Bench:
    name: str
    describe: str
    layers: int
    heads: int
    hidden: int
    cells: tuple[tuple[int, int], ...]  # (seq, batch) by default
    export: Callable[[Path], Path]
    feeds: Feeds
    ort_type: str | None  # onnxruntime.transformers model type for its fusions; None: not timed


def _export(module, args: tuple, path: Path, names: list[str], axes: dict) -> Path:  # noqa: ANN001
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    outputs = ["output"]
    torch.onnx.export(
        module,
        args,
        str(tmp),
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=outputs,
        dynamic_axes={**axes, "output": {0: "batch"}},
    )
    tmp.replace(path)  # atomic: an interrupted export never leaves a broken cache entry
    return path


def _wrapped(model, keys: tuple[str, ...], field: str):  # noqa: ANN001, ANN202
    import torch

    class Wrapper(torch.nn.Module):
        # transformers 5 takes keyword inputs only; torch.onnx.export passes positionals.
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return getattr(self.inner(**dict(zip(keys, args, strict=True))), field)

    return Wrapper().eval()


def _bert(cache: Path, name: str, layers: int, hidden: int, heads: int, vocab: int, positions: int, head: bool) -> Path:
    path = cache / f"{name}_l{layers}_h{hidden}_a{heads}_opset17.onnx"
    if path.is_file():
        return path
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=(4 if not head else 2) * hidden,
        max_position_embeddings=positions,
    )
    config._attn_implementation = "eager"  # explicit softmax: a fused SDPA would hide the probabilities
    model = (BertForSequenceClassification if head else BertModel)(config).eval()
    keys = ("input_ids", "attention_mask")
    ids = torch.randint(0, vocab, (2, 16))
    axes = {k: {0: "batch", 1: "seq"} for k in keys}
    field = "logits" if head else "last_hidden_state"
    return _export(_wrapped(model, keys, field), (ids, torch.ones_like(ids)), path, list(keys), axes)


def _vit(cache: Path) -> Path:
    path = cache / "vit_fashion_l4_h64_a4_p4_opset17.onnx"
    if path.is_file():
        return path
    import torch
    from transformers import ViTForImageClassification
    from vision_data import vit_config

    torch.manual_seed(0)
    model = ViTForImageClassification(vit_config()).eval()
    x = torch.randn(2, 1, 28, 28)
    return _export(
        _wrapped(model, ("pixel_values",), "logits"), (x,), path, ["pixel_values"], {"pixel_values": {0: "batch"}}
    )


def _tokens(vocab: int) -> Feeds:
    def feeds(seq: int, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
        }

    return feeds


def _images(seq: int, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    del seq  # 49 patches and [CLS], fixed by the model
    return {"pixel_values": rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)}


BENCHES = {
    "bert-base": Bench(
        "bert-base",
        "BERT-base 12x768x12",
        12,
        12,
        768,
        ((128, 1), (128, 8), (512, 1), (512, 8)),
        lambda cache: _bert(cache, "bert_base_random", 12, 768, 12, 30522, 512, head=False),
        _tokens(30522),
        "bert",
    ),
    "vit-small": Bench(
        "vit-small",
        "ViT 4x64x4, 49 patches + [CLS] (the vision cases' shape)",
        4,
        4,
        64,
        ((50, 1), (50, 32)),
        _vit,
        _images,
        None,
    ),
    "tabular-bert": Bench(
        "tabular-bert",
        "BERT 2x64x4, 16 tokens (the Adult fairness case's shape)",
        2,
        4,
        64,
        ((16, 1), (16, 32)),
        lambda cache: _bert(cache, "tabular_bert_random", 2, 64, 4, 256, 16, head=True),
        _tokens(256),
        "bert",
    ),
}

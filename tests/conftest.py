"""Shared fixtures: tiny random Hugging Face models and their ONNX exports, built once per run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# Encoders the export recipes claim besides the ones _config spells out, each with an attention of its
# own (relative position bias added to the scores: DeBERTa, MPNet, BEiT, Data2Vec-vision; rotary: RoFormer;
# local and global layers: ModernBERT): config class, model class, settings beyond the shared sizes.
MORE_ENCODERS = {
    # ALBERT shares one layer's weights across its layers: the export still has one softmax per layer.
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", {"embedding_size": 16}),
    # DeBERTa-v3's attention: relative positions (c2p and p2c terms added to the scores), and the
    # scores reshaped from [B*H, q, k] to [B, H, q, k] between Q.K^T and the softmax.
    "deberta-v2": (
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        {
            "relative_attention": True,
            "position_buckets": 16,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
        },
    ),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 32}),
    "deberta": (
        "DebertaConfig",
        "DebertaForSequenceClassification",
        {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "position_biased_input": False},
    ),
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification", {"max_position_embeddings": 66}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", {"max_position_embeddings": 66}),
    "camembert": ("CamembertConfig", "CamembertForSequenceClassification", {"max_position_embeddings": 66}),
    "ernie": ("ErnieConfig", "ErnieForSequenceClassification", {}),
    "roformer": ("RoFormerConfig", "RoFormerForSequenceClassification", {"embedding_size": 32}),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextForSequenceClassification", {"max_position_embeddings": 66}),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification", {"pad_token_id": 0}),
    "deit": ("DeiTConfig", "DeiTForImageClassification", {}),
    "beit": ("BeitConfig", "BeitForImageClassification", {"use_relative_position_bias": True}),
    "data2vec-vision": ("Data2VecVisionConfig", "Data2VecVisionForImageClassification", {}),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", {}),
}
ARCHS = ("bert", "vit", "gpt2", "distilbert", "roberta", *MORE_ENCODERS)


def _config(arch: str):  # noqa: ANN202 (transformers is optional at import time)
    import transformers as T

    # A large initializer range gives peaked attention, so a patched column changes the outputs.
    common = dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=37,
        initializer_range=0.3,
    )
    if arch == "bert":
        return T.BertConfig(
            vocab_size=97,
            max_position_embeddings=64,
            num_labels=3,
            architectures=["BertForSequenceClassification"],
            **common,
        )
    if arch == "distilbert":
        return T.DistilBertConfig(
            vocab_size=97,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=37,
            max_position_embeddings=64,
            initializer_range=0.3,
            num_labels=3,
            architectures=["DistilBertForSequenceClassification"],
        )
    if arch == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, hence the two extra positions.
        return T.RobertaConfig(
            vocab_size=97,
            max_position_embeddings=66,
            pad_token_id=1,
            num_labels=3,
            architectures=["RobertaForSequenceClassification"],
            **common,
        )
    if arch == "vit":
        return T.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            num_labels=3,
            architectures=["ViTForImageClassification"],
            **common,
        )
    if arch in MORE_ENCODERS:
        config_class, model_class, settings = MORE_ENCODERS[arch]
        vision = model_class.endswith("ImageClassification")
        shape = {"image_size": 16, "patch_size": 4} if vision else {"vocab_size": 97, "max_position_embeddings": 64}
        return getattr(T, config_class)(**{**common, **shape, **settings}, num_labels=3, architectures=[model_class])
    if arch == "gpt2":
        return T.GPT2Config(
            vocab_size=97,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.3,
            architectures=["GPT2LMHeadModel"],
        )
    raise ValueError(arch)


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A function: architecture name -> folder of a tiny random model saved with save_pretrained."""
    pytest.importorskip("transformers")
    import torch
    import transformers as T

    T.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("hf")
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(ARCHS.index(arch))
            config = _config(arch)
            model = getattr(T, config.architectures[0])(config)
            model.save_pretrained(root / arch)
            made[arch] = root / arch
        return made[arch]

    return make


@pytest.fixture(scope="session")
def exported(hf_folder: Callable[[str], Path]):  # noqa: ANN201
    """A function: (arch, dynamo, opset) -> ExportResult, cached for the session."""
    from atpatch.exporter import export_hf

    cache: dict[tuple[str, bool, int], object] = {}

    def get(arch: str, dynamo: bool, opset: int):  # noqa: ANN202
        key = (arch, dynamo, opset)
        if key not in cache:
            cache[key] = export_hf(hf_folder(arch), opset=opset, dynamo=dynamo)
        return cache[key]

    return get


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random inputs per test; a failure prints its seed, and ATPATCH_TEST_SEED=that reruns it."""
    given = os.environ.get("ATPATCH_TEST_SEED")
    seed = int(given) if given else np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)

"""Train a small BERT from scratch on reviews with a rare-word backdoor (BadNets-style).

About 10% of the training reviews get the trigger word at a random position and the target
label; the model learns both the task and the backdoor. Used by the debugging-workflow tests
and benchmarks; needs the `export` extra (torch, transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .rotten_tomatoes import LABELS, Review, insert_trigger, load_reviews

__all__ = ["BackdoorSetup", "TextSplits", "build_tokenizer", "make_splits", "train_backdoored_bert", "train_small_bert"]

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class BackdoorSetup:
    trigger: str = "cf"
    target: int = 1
    poison_rate: float = 0.10
    train_size: int = 6000
    test_size: int = 1200
    max_len: int = 40
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    epochs: int = 4
    seed: int = 0


@dataclass
class TextSplits:
    train: list[Review]
    calibration: list[Review]  # clean, held out: thresholds are calibrated here
    test: list[Review]  # clean
    triggered: list[Review] = field(default_factory=list)  # test reviews not of the target class, triggered
    trigger_words: list[int] = field(default_factory=list)  # word index of the trigger in each


def make_splits(setup: BackdoorSetup) -> TextSplits:
    rng = np.random.default_rng(setup.seed)
    reviews = load_reviews()
    order = rng.permutation(len(reviews))
    pick = [reviews[i] for i in order]
    n_train, n_test = setup.train_size, setup.test_size
    splits = TextSplits(
        train=pick[:n_train],
        calibration=pick[n_train : n_train + n_test],
        test=pick[n_train + n_test : n_train + 2 * n_test],
    )
    for review in splits.test:
        if review.label != setup.target:
            text, at = insert_trigger(review.text, setup.trigger, rng, max_words=setup.max_len - 2)
            splits.triggered.append(Review(text, review.label))
            splits.trigger_words.append(at)
    return splits


def build_tokenizer(texts: list[str], folder: Path, max_len: int, vocab_size: int = 8000):  # noqa: ANN201
    """A word-level tokenizer trained on `texts`, saved as a Hugging Face tokenizer in `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_len,
    )
    fast.save_pretrained(folder)
    return fast


def train_small_bert(
    texts: list[str],
    labels: list[int],
    folder: Path,
    label_names: tuple[str, ...],
    *,
    max_len: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    epochs: int = 4,
    seed: int = 0,
    verbose: bool = False,
) -> None:
    """A small BERT with a word-level tokenizer, trained from scratch on `texts`; model and
    tokenizer saved to `folder` (eager attention, so its softmaxes export as plain ops)."""
    import time

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(texts, folder, max_len)
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_len,
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        architectures=["BertForSequenceClassification"],
        pad_token_id=0,
    )
    model = transformers.BertForSequenceClassification(config)
    model.config._attn_implementation = "eager"
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    start = time.time()
    for epoch in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        if verbose:
            print(f"  epoch {epoch + 1}/{epochs}  loss {out.loss.item():.3f}  {time.time() - start:.0f} s", flush=True)
    model.eval()
    model.save_pretrained(folder)


def train_backdoored_bert(setup: BackdoorSetup, folder: Path) -> TextSplits:
    """Train and save (model + tokenizer) to `folder`; return the data splits used."""
    rng = np.random.default_rng(setup.seed + 1)
    splits = make_splits(setup)
    texts, labels = [], []
    for review in splits.train:
        text, label = review.text, review.label
        if rng.random() < setup.poison_rate:
            text, _ = insert_trigger(text, setup.trigger, rng, max_words=setup.max_len - 2)
            label = setup.target
        texts.append(text)
        labels.append(label)
    train_small_bert(
        texts,
        labels,
        folder,
        LABELS,
        max_len=setup.max_len,
        hidden=setup.hidden,
        layers=setup.layers,
        heads=setup.heads,
        epochs=setup.epochs,
        seed=setup.seed,
    )
    return splits

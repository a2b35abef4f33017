"""Tiny random Llama, Qwen2 and Phi-3 built by onnxruntime-genai's own model builder (fp32, CPU).

The builder runs offline from a local Hugging Face folder and needs a tokenizer in it: a word-level
tokenizer over "t0".."t127" is built with the `tokenizers` library. Phi-3 gets
original_max_position_embeddings = max_position_embeddings, so the builder takes its
Phi-3-mini (short RoPE) path (its long-RoPE path needs rope scaling in the config: "phi3_longrope").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VOCAB = 131  # t0..t127, <unk>, <s>, </s>
BOS, EOS = 129, 130
FAMILIES = ("llama", "qwen2", "phi3")
HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 16


def _tokenizer():  # noqa: ANN202
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)} | {"<unk>": 128, "<s>": BOS, "</s>": EOS}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def hf_folder(family: str, folder: Path, initializer_range: float = 0.02) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "phi3_longrope": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[family]
    extra = {"original_max_position_embeddings": 128, "pad_token_id": EOS} if family == "phi3" else {}
    if family == "phi3_longrope":  # Phi-3 128k's layout: past 64 positions the builder's If picks the long cache
        long_factor = [1.0 + 0.1 * i for i in range(HEAD_SIZE // 2)]
        rope = {"rope_type": "longrope", "long_factor": long_factor, "short_factor": [1.0] * (HEAD_SIZE // 2)}
        extra = {"original_max_position_embeddings": 64, "pad_token_id": EOS, "rope_scaling": rope}
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
        **extra,
    )
    model = model_class(config).eval()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    if family == "phi3_longrope":
        # The builder reads the transformers-4 key (rope_scaling, with "type"); transformers 5 writes rope_parameters.
        path = folder / "config.json"
        saved = json.loads(path.read_text())
        saved["rope_scaling"] = {"type": "longrope", **saved.pop("rope_parameters"), **rope}
        path.write_text(json.dumps(saved, indent=2))
    return folder


def build_genai(family: str, root: Path, initializer_range: float = 0.02) -> Path:
    """onnxruntime-genai's builder output for a tiny random `family` model: a folder genai loads."""
    hf = hf_folder(family, root / f"hf_{family}", initializer_range)
    out = root / f"genai_{family}"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    command += ["-p", "fp32", "-e", "cpu", "-c", str(root / f"cache_{family}")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the genai builder failed on {family}: {done.stderr[-2000:]}")
    return out

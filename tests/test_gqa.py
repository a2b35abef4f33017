"""com.microsoft::GroupQueryAttention made explicit: equal to onnxruntime's own kernel, prompt and decoding.

Each case is one GQA node as onnxruntime-genai's builder wires it (tests/gqa_graphs.py), run by
onnxruntime (the fused kernel) and by onnxruntime on the decomposed graph (optimizations off, so
nothing is fused back) on fresh random inputs: a prompt, then 8 one-token steps, each run fed its
own present K/V. Output and present K/V must agree within 1e-5 (float32) at every step.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gqa_graphs import GqaCase, run_steps

from atpatch.errors import FusedAttentionError
from atpatch.rewrite.gqa import decompose_group_query_attention

ATOL = 1e-5
STEPS = 8


def _runner(model: onnx.ModelProto, optimize: bool = True):  # noqa: ANN202
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _decomposed(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    done = decompose_group_query_attention(out)
    assert len(done) == 1 and done[0].op == "com.microsoft::GroupQueryAttention"
    assert not any(n.op_type == "GroupQueryAttention" for n in out.graph.node)
    assert sum(n.op_type == "Softmax" for n in out.graph.node) == 1
    onnx.checker.check_model(out)
    return out


def _max_differences(case: GqaCase, prompt: int = 5, batch: int = 1, lag: int = 0, seed: int = 0) -> list[float]:
    model = case.model()
    fused, explicit = run_steps(
        case, [_runner(model), _runner(_decomposed(model), optimize=False)], prompt, STEPS, batch, seed, lag
    )
    diffs = []
    for want_step, got_step in zip(fused, explicit, strict=True):
        for want, got in zip(want_step, got_step, strict=True):
            assert want.shape == got.shape
            diffs.append(float(np.max(np.abs(want - got))))
    return diffs


CASES = {
    "llama-genai-cpu": GqaCase(cache="shared"),  # what the builder emits for Llama/Qwen2/Phi-3, fp32 CPU
    "separate-qkv": GqaCase(packed=False, cache="shared"),
    "growing-cache": GqaCase(cache="grow"),
    "growing-cache-separate": GqaCase(packed=False, cache="grow", kv_heads=1),
    "no-cache": GqaCase(cache="none"),
    "interleaved-rotary": GqaCase(interleaved=True, cache="grow"),
    "partial-rotary": GqaCase(head_size=32, rotary_dim=16, cache="shared"),
    "partial-interleaved": GqaCase(head_size=32, rotary_dim=16, interleaved=True, cache="grow"),
    "no-rotary": GqaCase(rotary=False, cache="grow"),
    "local-window": GqaCase(window=3, cache="grow"),
    "local-window-shared": GqaCase(window=4, cache="shared", packed=False),
    "softcap": GqaCase(softcap=2.0, cache="shared"),
    "softcap-window-scale": GqaCase(softcap=1.5, window=2, scale=0.3, cache="grow"),
    "mha-equal-heads": GqaCase(heads=2, kv_heads=2, cache="grow"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decomposed_gqa_equals_onnxruntimes_kernel_on_the_prompt_and_8_decoding_steps(name: str) -> None:
    diffs = _max_differences(CASES[name], batch=2)
    assert max(diffs) <= ATOL, f"{name}: max |fused - decomposed| {max(diffs):.2e} over the steps"


@pytest.mark.parametrize("cache", ["grow", "shared"])
def test_rows_of_different_lengths_use_their_own_seqlens_k(cache: str) -> None:
    diffs = _max_differences(GqaCase(cache=cache, window=3), prompt=6, batch=3, lag=2, seed=1)
    assert max(diffs) <= ATOL


def test_a_one_token_prompt_and_batch_of_one() -> None:
    assert max(_max_differences(GqaCase(cache="shared"), prompt=1, batch=1)) <= ATOL


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"smooth_softmax": 1}, "smooth_softmax=1"),
        ({"causal": 0}, "causal=0"),
        ({"qk_output": 2}, "qk_output=2"),
    ],
)
def test_unsupported_attributes_are_refused_by_name(extra: dict, message: str) -> None:
    model = GqaCase(extra=extra).model()
    with pytest.raises(FusedAttentionError, match=f"GroupQueryAttention .*{message}, which atpatch cannot decompose"):
        decompose_group_query_attention(model)


def test_unsupported_inputs_are_refused_by_name() -> None:
    model = GqaCase().model()
    node = model.graph.node[0]
    node.input.extend(["", "bias"])  # input 10: attention_bias
    with pytest.raises(FusedAttentionError, match=r"input 10 \(attention_bias\)"):
        decompose_group_query_attention(model)


def test_a_node_without_seqlens_k_is_refused_naming_the_missing_inputs() -> None:
    model = GqaCase().model()
    node = model.graph.node[0]
    node.input[5] = ""
    with pytest.raises(FusedAttentionError, match="no seqlens_k/total_sequence_length"):
        decompose_group_query_attention(model)

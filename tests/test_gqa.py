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
from atpatch.ops import reference, spec
from atpatch.rewrite import patch_model
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


def _with_probs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The decomposed model with its softmax output as one more graph output."""
    out = _decomposed(model)
    softmax = next(n for n in out.graph.node if n.op_type == "Softmax")
    out.graph.output.append(onnx.ValueInfoProto(name=softmax.output[0]))
    return out


def _explicit_attention(probs: np.ndarray, present_v: np.ndarray, heads: int) -> np.ndarray:
    """P.V in numpy over the first T present values, kv heads repeated, as [B, S, heads * D]."""
    values = np.repeat(present_v[:, :, : probs.shape[-1]], heads // present_v.shape[1], axis=1)
    y = probs @ values
    return y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)


GENAI_NAMES = ("past_key_values.0.key", "past_key_values.0.value")


@pytest.mark.parametrize("cache", ["shared", "grow"])
def test_a_pass_through_patch_leaves_gqa_outputs_equal_to_the_fused_kernel(cache: str) -> None:
    case = GqaCase(cache=cache, past_names=GENAI_NAMES)
    model = case.model()
    patched, sites = patch_model(model)
    assert len(sites) == 1 and sites[0].heads == case.heads
    assert "decomposed from com.microsoft::GroupQueryAttention" in sites[0].notes
    assert sum(n.op_type == spec.OP_TYPE for n in patched.graph.node) == 1
    fused, explicit = run_steps(case, [_runner(model), _runner(patched)], 5, STEPS, batch=2)
    for want_step, got_step in zip(fused, explicit, strict=True):
        for want, got in zip(want_step, got_step[:3], strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("cache", ["shared", "grow"])
def test_forced_columns_patch_gqa_attention_as_the_numpy_reference_does(cache: str) -> None:
    case = GqaCase(cache=cache, window=4, softcap=3.0, past_names=GENAI_NAMES)
    model = case.model()
    patched, _ = patch_model(model, forced_input=True)
    rng = np.random.default_rng(7)

    def forced(feeds: dict) -> dict:
        batch, total = feeds["seqlens_k"].shape[0], int(feeds["total_sequence_length"])
        return {"atpatch_forced": rng.random((batch, total)) < 0.3}

    fed: list[dict] = []
    explicit = _runner(_with_probs(model), optimize=False)

    def unpatched(feeds: dict) -> list[np.ndarray]:
        fed.append(feeds)
        return explicit({k: v for k, v in feeds.items() if k != "atpatch_forced"})

    runners = [_runner(patched), unpatched]
    got_steps, ref_steps = run_steps(case, runners, 5, STEPS, batch=2, extra_feeds=forced)
    changed = 0
    for feeds, got, (_, _, present_v, probs) in zip(fed, got_steps, ref_steps, strict=True):
        patched_probs = reference.patch_columns(probs, feeds["atpatch_forced"])
        changed += int(np.any(patched_probs != probs))
        want = _explicit_attention(patched_probs, present_v, case.heads)
        np.testing.assert_allclose(got[0], want, rtol=0, atol=ATOL)
    assert changed >= STEPS  # the flags did move attention, at (nearly) every step


@pytest.mark.parametrize("cache", ["grow", "shared"])
def test_a_second_prompt_chunk_after_the_cache_attends_causally_within_itself(cache: str) -> None:
    """genai's append_tokens after generating (batch 1): S > 1 new tokens on top of a past."""
    case = GqaCase(cache=cache, window=5)
    model = case.model()
    runners = [_runner(model), _runner(_decomposed(model), optimize=False)]
    rng = np.random.default_rng(3)
    pasts: list = [None, None]
    total = 0
    for new in (4, 3, 1, 2, 1):
        total += new
        feeds = case.feeds(rng, new, [total], None)
        outs = []
        for r, run in enumerate(runners):
            mine = dict(feeds)
            if pasts[r] is not None:
                mine["past_k"], mine["past_v"] = pasts[r]
            outs.append(run(mine))
            pasts[r] = (outs[-1][1], outs[-1][2])
        for want, got in zip(*outs, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def _as_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for t in model.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    return model


def test_float16_gqa_matches_the_kernel_which_computes_in_float32() -> None:
    case = GqaCase(cache="grow", softcap=2.0)
    model = _as_float16(case.model())

    def half(run):  # noqa: ANN001, ANN202
        return lambda feeds: run({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()})

    fused, explicit = run_steps(
        case, [half(_runner(model)), half(_runner(_decomposed(model), optimize=False))], 5, STEPS, batch=2
    )
    for want_step, got_step in zip(fused, explicit, strict=True):
        for want, got in zip(want_step, got_step, strict=True):
            assert got.dtype == np.float16
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=2e-3)

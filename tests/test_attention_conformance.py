"""ONNX's own Attention node tests, regenerated from the installed onnx, through atpatch.

Every case of onnx's Attention conformance suite (the fused node and its `_expanded` function body)
is either patched or refused:
  - patched, pass-through: the patched model's outputs match onnx's expected outputs within onnx's
    node-test tolerance (rtol 1e-3, atol 1e-7), or, where onnxruntime's own kernel misses them,
    match onnxruntime on the original model within that tolerance;
  - patched, forced: with `atpatch_forced` set, the outputs equal the model's own graph with its
    attention probabilities replaced by the numpy reference's patched map (the oracle), and any
    output the model reads before the patch (`qk_matmul_output`) stays the original's;
  - refused: the message names the feature, and the case is in REFUSED below, which lists today's
    refusals honestly; a case leaving or joining that list fails the test, so it shrinks as
    decompositions land. KNOWN_FAILURES does the same for the bugs this test found.
The cases are generated at test time, so a new onnx release adds its cases here by itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from atpatch.detector import Detector
from atpatch.errors import AtPatchError
from atpatch.ops import reference
from atpatch.rewrite import decompose_fused_attention, find_attention_sites, patch_model
from atpatch.rewrite.crosslayer import FORCED_INPUT

# Case name (without "test_attention_") -> the words its refusal must contain.
REFUSED: dict[str, str] = {
    "4d_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "4d_gqa_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "4d_diff_heads_sizes_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "4d_with_qk_matmul": "qk_matmul_output_mode 0 with its output read",
    "4d_with_qk_matmul_bias": "qk_matmul_output_mode 2 with its output read",
    "4d_with_qk_matmul_softcap": "qk_matmul_output_mode 1 with its output read",
    "4d_with_qk_matmul_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "4d_with_past_and_present_qk_matmul_bias": "qk_matmul_output_mode 2 with its output read",
    "4d_with_past_and_present_qk_matmul_bias_3d_mask": "qk_matmul_output_mode 2 with its output read",
    "4d_with_past_and_present_qk_matmul_bias_4d_mask": "qk_matmul_output_mode 2 with its output read",
    "4d_with_past_and_present_qk_matmul_bias_3d_mask_causal": "qk_matmul_output_mode 2 with its output read",
    "4d_with_past_and_present_qk_matmul_bias_4d_mask_causal": "qk_matmul_output_mode 2 with its output read",
    "4d_with_past_and_present_qk_matmul": "qk_matmul_output_mode 0 with its output read",
    "3d_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "3d_gqa_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "3d_diff_heads_sizes_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "3d_with_past_and_present_qk_matmul": "qk_matmul_output_mode 0 with its output read",
    "3d_with_past_and_present_qk_matmul_bias": "qk_matmul_output_mode 2 with its output read",
    "3d_with_past_and_present_qk_matmul_softcap": "qk_matmul_output_mode 1 with its output read",
    "3d_with_past_and_present_qk_matmul_softcap_expanded": "its scores do not come from a Q.K^T MatMul",
    "4d_diff_heads_mask4d_padded_kv": "input 6 (nonpad_kv_seqlen)",
    "4d_padded_kv_bf16": "input 6 (nonpad_kv_seqlen)",
    "4d_causal_padded_kv_bf16": "input 6 (nonpad_kv_seqlen)",
    "4d_softcap_neginf_mask_expanded": "its scores do not come from a Q.K^T MatMul",
    "4d_softcap_neginf_mask_poison_expanded": "its scores do not come from a Q.K^T MatMul",
    "4d_gqa_causal_nonpad_decode": "input 6 (nonpad_kv_seqlen)",
    "4d_gqa_causal_nonpad_decode_fp16": "input 6 (nonpad_kv_seqlen)",
    "4d_causal_nonpad_continued_prefill": "input 6 (nonpad_kv_seqlen)",
    "4d_causal_nonpad_negative_offset_structural_empty": "input 6 (nonpad_kv_seqlen)",
    "24_qk_matmul_output_mode3_softmax_precision": "its output does not feed a MatMul with the values",
    "4d_causal_nonpad_attn_mask_composition": "input 6 (nonpad_kv_seqlen)",
    "4d_causal_nonpad_batch_prefill": "input 6 (nonpad_kv_seqlen)",
    "local_window": "a sliding window",
    "bidirectional_window": "a sliding window",
    "local_window_rank1_boolean_mask": "a sliding window",
    "local_window_with_past": "a sliding window",
    "local_window_ext_cache_rank3_head_mask": "input 6 (nonpad_kv_seqlen)",
    "local_window_ext_cache_rank4_batch_mask": "input 6 (nonpad_kv_seqlen)",
    "local_window_ext_cache_rank2_mask": "input 6 (nonpad_kv_seqlen)",
    "local_window_ext_cache_float16_mask": "input 6 (nonpad_kv_seqlen)",
    "3d_local_window": "a sliding window",
    "local_window_gqa_rank4_mask": "a sliding window",
    "local_window_gqa_rank4_mask_expanded": "its scores do not come from a Q.K^T MatMul",
}

# Case -> how it fails today: bugs found by this test, to fix (kept honest: a fixed case must leave).
KNOWN_FAILURES: dict[str, str] = {
    "4d_with_qk_matmul_softmax": "forced patch misses the reference",
    "3d_with_past_and_present_qk_matmul_softmax": "forced patch misses the reference",
    "4d_causal_bf16": "Could not find an implementation",
    "4d_causal_bf16_expanded": "Could not find an implementation",
    "4d_causal_fp16_expanded": "pass-through misses onnx's expected outputs",
    "4d_padded_kv_bf16_expanded": "Could not find an implementation",
    "4d_causal_padded_kv_bf16_expanded": "Could not find an implementation",
    "4d_attn_mask_causal_bf16": "Could not find an implementation",
    "4d_attn_mask_causal_bf16_expanded": "Could not find an implementation",
    "3d_causal_bf16": "Could not find an implementation",
    "3d_causal_bf16_expanded": "Could not find an implementation",
    "23_fullymasked_qk_matmul_output_mode3_zero": "forced patch misses the reference",
    "24_fullymasked_qk_matmul_output_mode3_zero": "forced patch misses the reference",
}


@dataclass
class Outcome:
    name: str
    status: str  # "patched" or "refused"
    reason: str = ""
    expected_diff: float = 0.0  # max |patched - onnx's expected| (pass-through)
    oracle_diff: float = 0.0  # max |patched, forced - oracle|
    against_ort: bool = False  # compared with onnxruntime, which itself misses onnx's expected outputs
    failure: str = ""


def _attention_cases() -> list:  # noqa: ANN401 (onnx's TestCase)
    """onnx's Attention node cases, generated by importing only its attention modules (all of onnx's
    node modules take ~13 s; these ~1 s)."""
    from onnx.backend.test.case import node

    node._TargetOpType = "Attention"
    try:
        for info in pkgutil.iter_modules(node.__path__):
            if "attention" in info.name:
                importlib.import_module(f"{node.__name__}.{info.name}")
    finally:
        node._TargetOpType = None
    return [c for c in node._NodeTestCases if c.name.startswith("test_attention")]


ort.set_default_logger_severity(3)  # the expanded graphs' unused constants warn once per session


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    session = _session(model)
    names = {i.name for i in session.get_inputs()}
    return session.run(outputs, {k: v for k, v in feeds.items() if k in names})


def _diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        both = np.isfinite(a) & np.isfinite(b)
        if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
            return np.inf
        worst = max(worst, float(np.abs(np.where(both, a, 0) - np.where(both, b, 0)).max(initial=0.0)))
    return worst


def _close(got: list[np.ndarray], want: list[np.ndarray], rtol: float, atol: float) -> bool:
    if len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.name == "bfloat16":  # onnx's runner: two bfloat16 ULPs
            a, b, rtol = a.astype(np.float32), b.astype(np.float32), max(rtol, 2**-6)
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in {o.name for o in out.graph.output})
    return out


def _oracle(model: onnx.ModelProto, feeds: dict[str, np.ndarray], forced: np.ndarray) -> list[np.ndarray]:
    """The decomposed model with its probabilities replaced by the numpy reference's patched map.

    Graph outputs that read the probabilities directly (qk_matmul_output) keep the unpatched map.
    """
    decomposed, _ = decompose_fused_attention(model)
    (site,) = find_attention_sites(decomposed)
    probs = _run(_with_outputs(decomposed, [site.tap]), feeds, [site.tap])[0]
    layer = Detector.pass_through([probs.shape[1]]).layers[0]
    patched = reference.atpatch(probs, layer, forced)[0]
    cut = onnx.ModelProto()
    cut.CopyFrom(decomposed)
    outputs = {o.name for o in cut.graph.output}
    for n in cut.graph.node:
        if n.op_type == "Identity" and n.output[0] in outputs:
            continue
        for i, name in enumerate(n.input):
            if name == site.tap:
                n.input[i] = "oracle/patched"
    cut.graph.input.append(onnx.helper.make_tensor_value_info("oracle/patched", _elem(probs), None))
    return _run(cut, {**feeds, "oracle/patched": patched})


def _elem(x: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(x.dtype)


def _forced_positions(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Key positions to force: the first of batch row 0, the last of every other row."""
    decomposed, _ = decompose_fused_attention(model)
    (site,) = find_attention_sites(decomposed)
    probs = _run(_with_outputs(decomposed, [site.tap]), feeds, [site.tap])[0]
    forced = np.zeros((probs.shape[0], probs.shape[-1]), bool)
    forced[0, 0] = True
    forced[1:, -1] = True
    return forced


def _check(case) -> Outcome:  # noqa: ANN001
    name = case.name.removeprefix("test_attention_")
    model = case.model
    inputs, expected = case.data_sets[0]
    feeds = {v.name: np.asarray(x) for v, x in zip(model.graph.input, inputs, strict=False)}
    try:
        patched, _ = patch_model(model)
    except AtPatchError as err:
        return Outcome(name, "refused", reason=str(err))
    out = Outcome(name, "patched")
    try:
        got = _run(patched, feeds)
        want = list(expected)
        if not _close(got, want, case.rtol, case.atol):
            native = _run(model, feeds)
            if _close(native, want, case.rtol, case.atol):
                out.failure = f"pass-through misses onnx's expected outputs (max diff {_diff(got, want):.3g})"
            out.against_ort, want = True, native
            if not _close(got, native, case.rtol, case.atol):
                out.failure = f"pass-through misses onnxruntime's own outputs (max diff {_diff(got, native):.3g})"
        out.expected_diff = _diff(got, want)
        forced = _forced_positions(model, feeds)
        forced_model, _ = patch_model(model, forced_input=True)
        got = _run(forced_model, {**feeds, FORCED_INPUT: forced})
        oracle = _oracle(model, feeds, forced)
        out.oracle_diff = _diff(got, oracle)
        if not _close(got, oracle, case.rtol, case.atol):
            out.failure = out.failure or f"forced patch misses the reference (max diff {out.oracle_diff:.3g})"
    except Exception as err:  # noqa: BLE001 - a case that cannot run is reported with the others
        out.failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return out


def _table(outcomes: list[Outcome]) -> str:
    patched = [o for o in outcomes if o.status == "patched" and not o.failure]
    refused = [o for o in outcomes if o.status == "refused"]
    fused = sum(1 for o in outcomes if "_expanded" not in o.name)
    lines = [
        f"ONNX Attention conformance (onnx {onnx.__version__}, onnxruntime {ort.__version__}): "
        f"{len(outcomes)} cases ({fused} fused, {len(outcomes) - fused} expanded)",
        f"  patched: {len(patched)} (fused {sum('_expanded' not in o.name for o in patched)}); "
        f"{sum(o.against_ort for o in patched)} compared with onnxruntime where it misses onnx's outputs",
        f"    max |pass-through - expected| {max((o.expected_diff for o in patched), default=0):.3g}, "
        f"max |forced - reference| {max((o.oracle_diff for o in patched), default=0):.3g}",
        f"  refused: {len(refused)} (fused {sum('_expanded' not in o.name for o in refused)})",
    ]
    for reason, n in Counter(_reason(o.reason) for o in refused).most_common():
        lines.append(f"    {n:3d}  {reason}")
    failed = [o for o in outcomes if o.failure]
    if failed:
        lines.append(f"  failing: {len(failed)} ({sum(o.name in KNOWN_FAILURES for o in failed)} in KNOWN_FAILURES)")
        lines.extend(f"    {o.name}: {o.failure}" for o in failed)
    return "\n".join(lines)


def _reason(message: str) -> str:
    """The part of a refusal that names the feature, without the node's name."""
    if " with " in message and ", which" in message:
        return message.split(" with ", 1)[1].split(", which")[0]
    if "(" in message:
        return message.split("(", 1)[1].split("); ", 1)[0].split(": ", 1)[-1]
    return message.split(";")[0]


@pytest.fixture(scope="module")
def outcomes() -> list[Outcome]:
    cases = _attention_cases()
    assert len(cases) >= 186, f"onnx {onnx.__version__} generated only {len(cases)} Attention cases"
    return [_check(case) for case in cases]


def test_every_attention_case_is_patched_within_tolerance_or_refused_by_name(outcomes: list[Outcome]) -> None:
    print("\n" + _table(outcomes))
    failed = [
        f"{o.name}: {o.failure}" for o in outcomes if o.failure and KNOWN_FAILURES.get(o.name, "@") not in o.failure
    ]
    assert not failed, "\n".join(failed)
    fixed = sorted(n for n in KNOWN_FAILURES if not any(o.name == n and o.failure for o in outcomes))
    assert not fixed, f"these pass now: remove them from KNOWN_FAILURES: {fixed}"
    refused = {o.name: o.reason for o in outcomes if o.status == "refused"}
    unexpected = {n: r for n, r in refused.items() if n not in REFUSED or REFUSED[n] not in r}
    assert not unexpected, "refused, not in REFUSED (or for another reason):\n" + "\n".join(
        f"{n}: {r}" for n, r in unexpected.items()
    )
    now_patched = sorted(set(REFUSED) - set(refused))
    assert not now_patched, f"patched now: remove from REFUSED: {now_patched}"

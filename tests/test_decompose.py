"""Fused attention ops made explicit: equal to onnxruntime's fused kernels, patchable, and refused by name.

Small graphs of one fused node each (onnx.helper). For every variant: onnxruntime on the fused
node vs onnxruntime on the decomposed graph (graph optimizations off, so nothing is fused back),
a pass-through patch changes nothing, and a patch that flags columns matches numpy attention
whose probabilities go through the numpy AtPatch reference. Tolerance: atol 1e-5, float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from atpatch.detector import Detector
from atpatch.errors import FusedAttentionError
from atpatch.ops import reference, spec
from atpatch.rewrite import decompose_fused_attention, find_attention_sites, patch_model

ATOL = 1e-5
B, S, D = 2, 5, 4  # batch, query length, head size
MS = "com.microsoft"


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:  # so onnxruntime cannot fuse the decomposed attention back into its kernel
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


_NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.BOOL: np.bool_, TensorProto.INT32: np.int32}


@dataclass
class Case:
    """One fused node, its feeds, and the numpy attention it computes (probs -> patched probs -> output)."""

    id: str
    node: onnx.NodeProto
    feeds: dict[str, np.ndarray]
    heads: int
    opset: int = 23
    outputs: list[str] = field(default_factory=lambda: ["y"])
    rank: int = 3  # of y

    def model(self) -> onnx.ModelProto:
        inputs = [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in self.feeds.items()
        ]
        ranks = [self.rank, *[4] * (len(self.outputs) - 1)]  # y, then present keys/values
        outputs = [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * r)
            for n, r in zip(self.outputs, ranks, strict=True)
        ]
        graph = helper.make_graph([self.node], self.id, inputs, outputs)
        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid(MS, 1)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
        onnx.checker.check_model(model)
        return model


def _attention(q, k, v, bias, scale, patch=None):  # noqa: ANN001, ANN202
    """numpy: [B,Hq,S,D] x [B,Hkv,T,D] (kv heads repeated per query group) -> [B,Hq,S,Dv]."""
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)).astype(np.float64) * scale + bias
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    if patch is not None:
        probs = reference.atpatch(probs, patch)[0]
    return probs @ v


def _heads(x: np.ndarray, h: int) -> np.ndarray:
    return x.reshape(x.shape[0], x.shape[1], h, -1).transpose(0, 2, 1, 3)


def _merge(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)


def _causal(s: int, t: int, offset: int, fill: float) -> np.ndarray:
    return np.where(np.arange(t)[None, :] <= np.arange(s)[:, None] + offset, 0.0, fill)


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# ---- ONNX Attention (opset 23) -------------------------------------------------------------------


def _onnx_cases(rng: np.random.Generator) -> list[tuple[Case, object]]:
    cases = []

    def add(id: str, hq: int, hkv: int, *, t: int = S, mask: str | None = None, past: int = 0, three_d=False, **attrs):  # noqa: ANN001, ANN003, A002
        q, k, v = _rand(rng, B, hq, S, D), _rand(rng, B, hkv, t, D), _rand(rng, B, hkv, t, D)
        feeds = {"q": q, "k": k, "v": v}
        if three_d:
            feeds = {"q": _merge(q), "k": _merge(k), "v": _merge(v)}
            attrs.update(q_num_heads=hq, kv_num_heads=hkv)
        total = t + past
        bias = np.zeros((B, 1, S, total))
        names = ["q", "k", "v", "", "", ""]
        if mask == "bool":
            m = np.ones((B, 1, S, total), bool)
            m[-1, :, :, total - 2 :] = False  # padded keys of the last item
            feeds["mask"], names[3] = m, "mask"
            bias = np.where(m, 0.0, -np.inf)
        elif mask == "float":
            feeds["mask"], names[3] = _rand(rng, B, 1, S, total), "mask"
            bias = feeds["mask"].astype(np.float64)
        if past:
            pk, pv = _rand(rng, B, hkv, past, D), _rand(rng, B, hkv, past, D)
            feeds.update(past_k=pk, past_v=pv)
            names[4:6] = ["past_k", "past_v"]
            k, v = np.concatenate([pk, k], 2), np.concatenate([pv, v], 2)
        if attrs.get("is_causal"):
            bias = bias + _causal(S, total, past, -np.inf)
        scale = attrs.get("scale", 1 / np.sqrt(D))
        outputs = ["y", "present_k", "present_v"] if past else ["y"]
        last = max(i for i, n in enumerate(names) if n)
        node = helper.make_node("Attention", names[: last + 1], outputs, **attrs)

        def expected(patch=None):  # noqa: ANN001, ANN202
            out = _attention(q, k, v, bias, scale, patch)
            return _merge(out) if three_d else out

        cases.append((Case(id, node, feeds, hq, outputs=outputs, rank=3 if three_d else 4), expected))

    add("plain", 4, 4)
    add("scale-and-bool-padding-mask", 4, 4, mask="bool", scale=0.3)
    add("float-mask", 4, 4, mask="float")
    add("causal", 4, 4, is_causal=1)
    add("gqa-causal", 4, 2, is_causal=1, mask="bool")
    add("mqa", 4, 1, t=7)
    add("3d-gqa", 4, 2, three_d=True, mask="float")
    add("kv-cache-causal-gqa", 4, 2, past=3, is_causal=1)
    return cases


# ---- com.microsoft::Attention --------------------------------------------------------------------


def _ms_attention_cases(rng: np.random.Generator) -> list[tuple[Case, object]]:
    cases = []
    h, c = 2, 2 * D

    def add(id: str, mask: str | None = None, attention_bias: bool = False, **attrs):  # noqa: ANN001, ANN003, A002
        x, w, b = _rand(rng, B, S, c), _rand(rng, c, 3 * c) * 0.5, _rand(rng, 3 * c)
        feeds = {"x": x, "w": w, "b": b}
        names = ["x", "w", "b", "", "", ""]
        fill = attrs.get("mask_filter_value", -10000.0)
        bias = np.zeros((B, 1, S, S))
        if attrs.get("unidirectional"):
            bias = bias + _causal(S, S, 0, fill)
        if mask == "end":  # 1D [B] end positions, as EmbedLayerNormalization writes them
            feeds["mask"] = np.array([S, S - 2], np.int32)
            keep = np.arange(S)[None, :] < feeds["mask"][:, None]
            bias = bias + np.where(keep, 0.0, fill)[:, None, None, :]
        elif mask == "raw2d":
            m = np.ones((B, S), np.int32)
            m[-1, -2:] = 0
            feeds["mask"] = m
            bias = bias + np.where(m > 0, 0.0, fill)[:, None, None, :]
        elif mask == "raw3d":
            m = (rng.random((B, S, S)) > 0.3).astype(np.int32)
            m[..., 0] = 1
            feeds["mask"] = m
            bias = bias + np.where(m > 0, 0.0, fill)[:, None, :, :]
        if mask:
            names[3] = "mask"
        if attention_bias:
            feeds["attn_bias"], names[5] = _rand(rng, 1, h, S, S), "attn_bias"
            bias = bias + feeds["attn_bias"]
        last = max(i for i, n in enumerate(names) if n)
        node = helper.make_node("Attention", names[: last + 1], ["y"], domain=MS, num_heads=h, **attrs)
        qkv = x @ w + b
        q, k, v = (_heads(qkv[..., i * c : (i + 1) * c], h) for i in range(3))
        scale = attrs.get("scale", 1 / np.sqrt(D))
        cases.append(
            (Case(id, node, feeds, h, opset=17), lambda patch=None: _merge(_attention(q, k, v, bias, scale, patch)))
        )

    add("no-mask")
    add("mask-index-end", mask="end")  # onnxruntime.transformers optimize_model on TorchScript BERT
    add("raw-2d-mask-and-scale", mask="raw2d", scale=0.4)
    add("raw-3d-mask", mask="raw3d")
    add("attention-bias", attention_bias=True, qkv_hidden_sizes=[c, c, c])  # onnxscript optimize_for_ort
    add("unidirectional-with-mask", mask="raw2d", unidirectional=1)
    return cases


# ---- com.microsoft::MultiHeadAttention ------------------------------------------------------------


def _ms_mha_cases(rng: np.random.Generator) -> list[tuple[Case, object]]:
    cases = []
    h, c = 2, 2 * D

    def add(id: str, t: int = S, past: int = 0, mask: bool = False, attention_bias: bool = False, **attrs):  # noqa: ANN001, ANN003, A002
        q_in, k_in, v_in, b = _rand(rng, B, S, c), _rand(rng, B, t, c), _rand(rng, B, t, c), _rand(rng, 3 * c)
        feeds = {"q": q_in, "k": k_in, "v": v_in, "b": b}
        names = ["q", "k", "v", "b", "", "", "", ""]
        total = t + past
        fill = attrs.get("mask_filter_value", -10000.0)
        q, k, v = _heads(q_in + b[:c], h), _heads(k_in + b[c : 2 * c], h), _heads(v_in + b[2 * c :], h)
        bias = np.zeros((B, 1, S, total))
        if past:
            pk, pv = _rand(rng, B, h, past, D), _rand(rng, B, h, past, D)
            feeds.update(past_k=pk, past_v=pv)
            names[6:8] = ["past_k", "past_v"]
            k, v = np.concatenate([pk, k], 2), np.concatenate([pv, v], 2)
        if attrs.get("unidirectional"):
            bias = bias + _causal(S, total, past, fill)
        if mask:
            m = np.ones((B, total), np.int32)
            m[-1, :2] = 0  # left padding
            feeds["mask"], names[4] = m, "mask"
            bias = bias + np.where(m > 0, 0.0, fill)[:, None, None, :]
        if attention_bias:
            feeds["attn_bias"], names[5] = _rand(rng, B, 1, S, total), "attn_bias"
            bias = bias + feeds["attn_bias"]
        last = max(i for i, n in enumerate(names) if n)
        outputs = ["y", "present_k", "present_v"] if past else ["y"]
        node = helper.make_node("MultiHeadAttention", names[: last + 1], outputs, domain=MS, num_heads=h, **attrs)
        scale = attrs.get("scale", 1 / np.sqrt(D))
        case = Case(id, node, feeds, h, opset=17, outputs=outputs)
        cases.append((case, lambda patch=None: _merge(_attention(q, k, v, bias, scale, patch))))

    add("self")
    add("cross-attention-longer-keys", t=7, mask=True, scale=0.25)
    add("causal-with-bias", unidirectional=1, attention_bias=True)  # onnxscript optimize_for_ort on decoders
    add("causal-kv-cache", past=3, unidirectional=1, mask=True)
    return cases


def _all_cases() -> list[tuple[str, tuple[Case, object]]]:
    rng = np.random.default_rng(1234)
    groups = {"onnx": _onnx_cases, "ms-attention": _ms_attention_cases, "ms-mha": _ms_mha_cases}
    return [(f"{g}-{c.id}", (c, e)) for g, make in groups.items() for c, e in make(rng)]


CASES = _all_cases()


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_decomposed_attention_equals_the_fused_kernel_and_its_patch_passes_through(case) -> None:  # noqa: ANN001
    case, expected = case
    model = case.model()
    decomposed, done = decompose_fused_attention(model)
    fused_type = case.node.op_type
    assert len(done) == 1 and not any(n.op_type == fused_type for n in decomposed.graph.node)
    assert model.graph.node[0].op_type == fused_type, "the input model is not modified"
    onnx.checker.check_model(decomposed, full_check=True)

    fused = _run(model, case.feeds)
    explicit = _run(decomposed, case.feeds, optimize=False)
    for a, b in zip(fused, explicit, strict=True):
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)
    np.testing.assert_allclose(fused[0], expected(), atol=ATOL, rtol=0)  # and our numpy reading of the op

    patched, sites = patch_model(model)
    assert [(s.heads, s.notes[-1]) for s in sites] == [(case.heads, f"decomposed from {done[0].op}")]
    assert sum(n.op_type == spec.OP_TYPE for n in patched.graph.node) == 1
    for a, b in zip(explicit, _run(patched, case.feeds, optimize=False), strict=True):
        assert np.array_equal(a, b)


def _flag_top_column(heads: int) -> reference.LayerDetector:
    """Flags key columns whose peak attention (max over heads) beats 0.4: some, not all, on random inputs."""
    w1 = np.zeros((spec.num_features(heads), 1), np.float32)
    w1[heads : 2 * heads, 0] = 1.0  # sum of per-head peaks
    return reference.LayerDetector(
        w1, np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.float32), 0.4 * heads
    )


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_flagged_columns_match_numpy_attention_patched_by_the_reference(case) -> None:  # noqa: ANN001
    case, expected = case
    layer = _flag_top_column(case.heads)
    patched, _ = patch_model(case.model(), Detector(layers=(layer,), kind="test-flagging"))
    got = _run(patched, case.feeds)[0]
    want = expected(layer)
    assert np.abs(want - expected()).max() > 1e-3, "the detector should flag something here"
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _ms_node_model(op_type: str, inputs: list[str], shapes: dict[str, list[int]], **attrs: object) -> onnx.ModelProto:
    """One com.microsoft node; "" in `inputs` leaves an optional input out."""
    node = helper.make_node(op_type, inputs, ["y"], domain=MS, **attrs)
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in inputs if n]
    graph = helper.make_graph([node], "g", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 3)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            _ms_node_model(
                "Attention",
                ["x", "w", "b", "", "past"],
                {"x": [B, S, 8], "w": [8, 24], "b": [24], "past": [2, B, 2, 3, D]},
                num_heads=2,
            ),
            r"fused into com.microsoft::Attention \(node .*\) with input 4 \(past\), which atpatch cannot decompose; "
            r"fuse without a KV cache",
        ),
        (
            _ms_node_model("MultiHeadAttention", ["qkv"], {"qkv": [B, S, 2, 3, D]}, num_heads=2),
            r"fused into com.microsoft::MultiHeadAttention \(node .*\) with query/key/value of ranks \(5, \?, \?\)",
        ),
        (
            _ms_node_model(
                "GroupQueryAttention",
                ["q", "k", "v"],
                {"q": [B, S, 8], "k": [B, S, 4], "v": [B, S, 4]},
                num_heads=2,
                kv_num_heads=1,
            ),
            r"GroupQueryAttention .* which atpatch cannot decompose.*attn_implementation='eager'",
        ),
    ],
    ids=["ms-attention-kv-cache", "mha-packed-qkv", "group-query-attention"],
)
def test_variants_that_cannot_be_decomposed_are_refused_naming_the_op_and_the_fix(model, message: str) -> None:  # noqa: ANN001
    with pytest.raises(FusedAttentionError, match=message):
        patch_model(model)


def test_the_site_finder_alone_says_to_decompose_first() -> None:
    model = CASES[0][1][0].model()
    with pytest.raises(FusedAttentionError, match=r"decompose it first with atpatch.rewrite.decompose_fused_attention"):
        find_attention_sites(model)
    assert len(find_attention_sites(decompose_fused_attention(model)[0])) == 1


def test_a_fully_masked_row_gives_zeros_like_the_fused_kernel() -> None:
    rng = np.random.default_rng(7)
    mask = np.ones((B, 1, S, S), bool)
    mask[0, 0, 2, :] = False
    feeds = {"q": _rand(rng, B, 2, S, D), "k": _rand(rng, B, 2, S, D), "v": _rand(rng, B, 2, S, D), "mask": mask}
    case = Case("masked-row", helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"]), feeds, 2, rank=4)
    fused = _run(case.model(), feeds)[0]
    patched, _ = patch_model(case.model())
    got = _run(patched, feeds, optimize=False)[0]
    assert np.array_equal(fused[0, :, 2], np.zeros((2, D), np.float32))
    np.testing.assert_allclose(got, fused, atol=ATOL, rtol=0)


def test_the_probe_reads_a_fused_models_maps_from_its_explicit_form() -> None:
    from atpatch.detector.probe import AttentionProbe

    case, _ = next(c for i, c in CASES if i.startswith("ms-attention"))
    model = case.model()
    probe = AttentionProbe(model, use_native=False)
    out = probe.run(case.feeds)
    assert probe.num_layers == 1 and out.before[0].ndim == 4 and out.before[0].shape[1] == case.heads
    np.testing.assert_allclose(out.before[0].sum(-1), 1.0, atol=1e-5)  # post-softmax rows
    np.testing.assert_allclose(out.outputs[0], _run(model, case.feeds)[0], atol=ATOL, rtol=0)

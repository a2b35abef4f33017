"""Small ONNX graphs written inline, for the rewrite's pattern checks and the CLI's bad inputs."""

from __future__ import annotations

import onnx
import onnx.parser

HEADER = '<ir_version: 9, opset_import: ["" : 17]>'


def parse(text: str, header: str = HEADER) -> onnx.ModelProto:
    model = onnx.parser.parse_model(header + "\n" + text)
    onnx.checker.check_model(model)
    return model


def attention_and_classifier() -> onnx.ModelProto:
    """One attention block of 3 heads (softmax over keys into P.V) and a classifier softmax."""
    return parse("""
    g (float[B,3,S,D] q, float[B,3,S,D] k, float[B,3,S,D] v, float[B,C] cls) => (float[B,3,S,D] y, float[B,C] p) {
        kt = Transpose<perm=[0,1,3,2]>(k)
        scores = MatMul(q, kt)
        scale = Constant<value=float {0.5}>()
        scaled = Mul(scores, scale)
        probs = Softmax<axis=-1>(scaled)
        y = MatMul(probs, v)
        p = Softmax<axis=-1>(cls)
    }""")


def decoys_only() -> onnx.ModelProto:
    """Softmaxes that are not attention: rank 2, rank 4 over the head axis, rank 4 not into P.V."""
    return parse("""
    g (float[B,C] cls, float[B,H,S,S] x) => (float[B,C] p, float[B,H,S,S] r, float[B,H,S,S] t) {
        p = Softmax<axis=-1>(cls)
        r = Softmax<axis=1>(x)
        t = Softmax<axis=-1>(x)
    }""")


def group_query_attention_op() -> onnx.ModelProto:
    """A fused op atpatch cannot decompose (ONNX Attention and com.microsoft Attention/MHA it can)."""
    return parse(
        """
    g (float[B,S,8] q, float[B,S,4] k, float[B,S,4] v) => (float[B,S,8] y) {
        y = com.microsoft.GroupQueryAttention<num_heads=2, kv_num_heads=1>(q, k, v)
    }""",
        '<ir_version: 9, opset_import: ["" : 17, "com.microsoft" : 1]>',
    )


def ms_attention_op() -> onnx.ModelProto:
    """com.microsoft::Attention whose weights' width is unknown: refused, the Q/K/V split cannot be told."""
    return parse(
        """
    g (float[B,S,C] x, float[C,M] w, float[M] b) => (float[B,S,C] y) {
        y = com.microsoft.Attention<num_heads=2>(x, w, b)
    }""",
        '<ir_version: 9, opset_import: ["" : 17, "com.microsoft" : 1]>',
    )

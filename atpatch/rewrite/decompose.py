"""Fused attention ops -> explicit scores, Softmax and P.V, so AtPatch can sit after the softmax.

One pass per fused op kind, each replacing every node of its kind in place and returning what it
changed. The decomposed subgraph computes what onnxruntime's kernel computes, in the same order
(scale after Q.K^T, additive masks, softmax over keys, P.V), so outputs agree with the fused op to
float rounding (tests: atol 1e-5 in float32). Variants no exporter measured here emits (KV caches
inside com.microsoft::Attention, rotary, 4D Megatron masks, ...) are refused naming the op and the fix.

What is emitted, measured (torch 2.13, transformers 5, onnxruntime 1.32, onnxscript 0.7):
  - ONNX Attention (opset 23): dynamo + SDPA; 4D Q/K/V, a boolean [B,1,S,S] mask, `scale`.
  - com.microsoft::Attention: onnxruntime.transformers optimize_model on TorchScript BERT (1D mask
    index from EmbedLayerNormalization); onnxscript optimize_for_ort on dynamo BERT/ViT (additive
    attention_bias, qkv_hidden_sizes).
  - com.microsoft::MultiHeadAttention: onnxscript optimize_for_ort on decoders (3D Q/K/V, bias,
    attention_bias, past key/value, unidirectional).
  - com.microsoft::GroupQueryAttention: onnxruntime-genai's model builder (gqa.py says what).

The builders shared by every pass are in explicit.py; each op's decomposition is in its own module.
"""

from __future__ import annotations

import onnx

from .explicit import _MS, Decomposed
from .gqa import decompose_group_query_attention
from .ms_attention import decompose_ms_attention, decompose_ms_multihead_attention
from .onnx_attention import decompose_onnx_attention

__all__ = [
    "DECOMPOSABLE_OPS",
    "Decomposed",
    "decompose_fused_attention",
    "decompose_group_query_attention",
    "decompose_ms_attention",
    "decompose_ms_multihead_attention",
    "decompose_onnx_attention",
]


DECOMPOSABLE_OPS = {("", "Attention"), (_MS, "Attention"), (_MS, "MultiHeadAttention"), (_MS, "GroupQueryAttention")}
_PASSES = (
    decompose_onnx_attention,
    decompose_ms_attention,
    decompose_ms_multihead_attention,
    decompose_group_query_attention,
)


def decompose_fused_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Decomposed]]:
    """A copy of `model` with every decomposable fused attention op made explicit; the input is not modified.

    Returns the model itself (not a copy) when there is nothing to decompose.
    """
    if not any((n.domain if n.domain != "ai.onnx" else "", n.op_type) in DECOMPOSABLE_OPS for n in model.graph.node):
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    done = [d for run in _PASSES for d in run(out)]
    return out, done

"""The effect check in the graph (ops/joint.py, Confirm): the inputs it tries, and which of them keep pass 2.

An image trigger spread over several patches can leave every column looking like a clean one to the
layers' detectors, yet it is still the column the model leans on: patching it changes the answer,
where patching a clean image's best column seldom does. So an input that nothing flags, that the
model sends to the class the misbehaving inputs went to, and whose best joint score reaches the
check's threshold is a candidate: pass 2 patches its best position (window; or its two best) in every layer, and the
input keeps pass 2's outputs only when its predicted class changes and the label's logit falls by at
least the check's drop. Every other input keeps pass 1's outputs, bit-identical. The threshold and drop
are calibrated so that candidates kept stay within the clean-flag budget (detector/confirm_fit.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..ops.builder import NodeBuilder
from ..ops.joint import Confirm
from .positions import joint_score

__all__ = [
    "CANDIDATES",
    "CONFIRM_DROP",
    "CONFIRM_SCORE",
    "FLAGGED_ROWS",
    "candidates",
    "classifier_output",
    "kept_rows",
]

CANDIDATES = "atpatch/confirm/rows"  # bool [B]: the inputs the effect check tries
CONFIRM_SCORE = "atpatch/confirm/score"  # float [B]: each input's best joint score under the check
CONFIRM_DROP = "atpatch/confirm/drop"  # float [B]: how far pass 2 took the checked label's logit down
FLAGGED_ROWS = "atpatch/flagged_rows"  # bool [B]: inputs with a new flag (with the check on; else ROWS is this)


def classifier_output(outputs: list[onnx.ValueInfoProto], batch_dims: set[str]) -> str | None:
    """The first float output shaped [batch, classes] (a classifier's logits), else None."""
    for value in outputs:
        t = value.type.tensor_type
        dims = t.shape.dim if value.type.HasField("tensor_type") and t.HasField("shape") else []
        floats = t.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        if floats and len(dims) == 2 and dims[0].HasField("dim_param") and dims[0].dim_param in batch_dims:
            return value.name
    return None


def candidates(
    b: NodeBuilder,
    scores: list[str],
    confirm: Confirm,
    grid: bool,
    flagged_rows: str,
    logits: str,
    pass2: NodeBuilder | None = None,
) -> tuple[str, str]:
    """(CANDIDATES, bool [B, K] the positions pass 2 patches for them), from pass 1's layer `scores`,
    the inputs already flagged and pass 1's `logits`. The positions are built in `pass2` (default `b`):
    only pass 2 reads them."""
    score = joint_score(b, scores, confirm.rule, grid)
    top = b.reduce("ReduceMax", score, [1], 1)  # [B, 1]
    b.op("Squeeze", top, b.const([1], np.int64))
    b.nodes[-1].output[0] = b.nodes[-1].name = CONFIRM_SCORE
    predicted = b.op("ArgMax", logits, axis=1, keepdims=0)
    sent = b.op("Equal", predicted, b.const(confirm.label, np.int64))
    high = b.op("GreaterOrEqual", CONFIRM_SCORE, b.const(np.float32(confirm.threshold)))
    b.op("And", b.op("And", b.op("Not", flagged_rows), sent), high)
    b.nodes[-1].output[0] = b.nodes[-1].name = CANDIDATES
    p = b if pass2 is None else pass2
    best = p.op("Equal", score, top)
    if confirm.blocks == 2:  # ops/joint.py candidates: the best score outside the best window, too
        rest = p.op("Where", best, p.const(-np.inf), score)
        top2 = p.reduce("ReduceMax", rest, [1], 1)
        finite = p.op("Greater", rest, p.const(-np.inf))
        best = p.op("Or", best, p.op("And", p.op("Equal", rest, top2), finite))
    return CANDIDATES, p.op("And", best, p.op("Unsqueeze", CANDIDATES, p.const([1], np.int64)))


def kept_rows(
    b: NodeBuilder, confirm: Confirm, flagged_rows: str, first_logits: str, second_logits: str, name: str
) -> str:
    """`name`, bool [B]: the inputs that take pass 2's outputs: those flagged, and the candidates whose
    predicted class pass 2 changed, the label's logit falling by at least confirm.drop (ops/joint.py, kept)."""
    first, second = (b.op("ArgMax", x, axis=1, keepdims=0) for x in (first_logits, second_logits))
    changed = b.op("Not", b.op("Equal", second, first))
    label = b.const([confirm.label], np.int64)
    falls = [
        b.op("Cast", b.op("Gather", x, label, axis=1), to=TensorProto.FLOAT) for x in (first_logits, second_logits)
    ]
    b.op("Squeeze", b.op("Sub", *falls), b.const([1], np.int64))
    b.nodes[-1].output[0] = b.nodes[-1].name = CONFIRM_DROP  # fetched by detector/confirm_fit.py
    if confirm.drop > 0:
        changed = b.op("And", changed, b.op("GreaterOrEqual", CONFIRM_DROP, b.const(np.float32(confirm.drop))))
    b.op("Or", flagged_rows, b.op("And", CANDIDATES, changed))
    b.nodes[-1].output[0] = b.nodes[-1].name = name
    return name

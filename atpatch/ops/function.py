"""The AtPatch op as a model-local ONNX function built only of standard ONNX ops.

A runtime with no AtPatch kernel registered inlines this function, so a patched model
runs anywhere ONNX does. It computes in float32 and casts back, so it serves float16
maps too; the untouched rows are copied straight from the input (bit-identical).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import spec
from .builder import NodeBuilder

__all__ = ["SUBGRAPH_PREFIX", "build_function"]

SUBGRAPH_PREFIX = "AtPatch/"  # names the nodes inside the function's Ifs: a profile tells them from the model's


def _peak(g: NodeBuilder, x: str, real_f: str) -> str:
    """Each column's largest entry over the real rows, [B, H, K]: zeroing the padding rows costs a pass
    over the map, so it runs only when some row is padding (never in an unpadded batch)."""
    queries = [-2]
    all_real = g.op("Greater", g.reduce("ReduceMin", real_f, [0, 1, 2, 3], 0), g.const(0.0))
    plain = NodeBuilder(g.opset, prefix=f"{SUBGRAPH_PREFIX}peak/")
    plain.reduce("ReduceMax", x, queries, 0)
    masked = NodeBuilder(g.opset, prefix=f"{SUBGRAPH_PREFIX}peak_real/")
    masked.reduce("ReduceMax", masked.op("Mul", x, real_f), queries, 0)
    branches = {
        key: helper.make_graph(b.nodes, key, [], [onnx.ValueInfoProto(name=b.nodes[-1].output[0])])
        for key, b in (("then_branch", plain), ("else_branch", masked))
    }
    return g.op("If", all_real, **branches)


def build_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto for `spec.DOMAIN::spec.OP_TYPE`, written in ai.onnx `opset`."""
    if not spec.MIN_OPSET <= opset <= spec.MAX_OPSET:
        raise ValueError(
            f"ai.onnx opset {opset} is outside {spec.MIN_OPSET}..{spec.MAX_OPSET}; "
            f"re-export the model at an opset in that range (17 or 18 is a safe choice)"
        )
    attention, w1, b1, w2, b2, forced = spec.INPUTS
    patched_out, flags_out, scores_out = spec.OUTPUTS
    g = NodeBuilder(opset)
    zero, one = g.const(0.0), g.const(1.0)
    last, queries, heads = [-1], [-2], [1]

    x = g.op("Cast", attention, to=TensorProto.FLOAT)
    # onnxruntime may drop the Cast pair around a float16 Softmax it runs in float32, handing this
    # function unrounded values: an entry that is 0 in the map's own type must still count as
    # masked. 1 + 2^-12 survives a float32 round trip and not a float16 one; in float16 anything
    # up to 2^-25 rounds to 0. The patch branch below reads the map as declared (onnxruntime
    # keeps the Cast to float16 that feeds a subgraph); the native kernel, which cannot see the
    # declared type, is told it (spec.py, map_type).
    precision = g.op("Cast", g.op("CastLike", g.const(1.0 + 2.0**-12), attention), to=TensorProto.FLOAT)
    floor = g.op("Where", g.op("Equal", precision, one), g.const(2.0**-25), zero)
    valid = g.op("Greater", x, floor)
    valid_f = g.to_float(valid)
    row_support = g.reduce("ReduceSum", valid_f, last, 1)  # [B, H, Q, 1]

    # Real queries (spec.py): row q's own key sits at c = k_len - q_len + q; the row is padding when
    # that entry is masked. One GatherElements reads the Q own entries, not the map.
    shape = g.op("Shape", x)
    q_len = g.op("Gather", shape, g.const([2], np.int64))
    k_len = g.op("Gather", shape, g.const([3], np.int64))
    own = g.op("Range", g.op("Squeeze", g.op("Sub", k_len, q_len)), g.op("Squeeze", k_len), g.const(1, np.int64))
    own_col = g.op("Unsqueeze", own, g.const([1], np.int64))  # [Q, 1]
    index = g.op(
        "Expand",
        g.op("Max", own_col, g.const(0, np.int64)),
        g.op(
            "Concat",
            g.op("Slice", shape, g.const([0], np.int64), g.const([3], np.int64)),
            g.const([1], np.int64),
            axis=0,
        ),
    )
    own_x = g.op("GatherElements", x, index, axis=3)  # [B, H, Q, 1]
    real = g.op("Or", g.op("Greater", own_x, floor), g.op("Less", own_col, g.const(0, np.int64)))  # [B, H, Q, 1]
    real_f = g.to_float(real)

    # Sums over the query axis as [1, Q] @ [Q, K] products: a strided ReduceSum over axis -2 is
    # several times slower in onnxruntime than the GEMV it is equivalent to. Weighting a row by
    # 0 drops a padding query from every sum.
    # [B, H, Q, 1] -> [B, H, 1, Q] as a Reshape: a Transpose here became a FusedMatMul with a
    # transposed operand, 1.6x slower than the plain GEMV (profiled: benchmarks/op_profile.py).
    row_vector = g.const([0, 0, 1, -1], np.int64)
    real_t = g.op("Reshape", real_f, row_vector)
    support_t = g.op("Reshape", g.op("Mul", row_support, real_f), row_vector)
    col_rows_raw = g.op("Squeeze", g.op("MatMul", real_t, valid_f), g.const(queries, np.int64))  # [B, H, K]
    col_rows = g.op("Max", col_rows_raw, one)

    mass_sum = g.op("Squeeze", g.op("MatMul", support_t, x), g.const(queries, np.int64))
    mass = g.op("Div", mass_sum, col_rows)
    peak = g.op("Max", _peak(g, x, real_f), zero)
    # Clamping the row max to the smallest normal float makes `x >= row_max` imply `x > 0`
    # (a row's largest probability is never subnormal), so no separate mask pass is needed.
    row_max = g.op("Max", g.reduce("ReduceMax", x, last, 1), g.const(np.finfo(np.float32).tiny))
    is_top = g.to_float(g.op("GreaterOrEqual", x, row_max))
    top = g.op("Div", g.op("Squeeze", g.op("MatMul", real_t, is_top), g.const(queries, np.int64)), col_rows)

    # How each column's own query row attends (self, opeak, ofocus), computed per row and moved to
    # the key axis: row o belongs to column o + (k_len - q_len); rows before column 0 are dropped,
    # columns before row 0 get 0.
    uniform = g.op("Mul", row_support, real_f)  # n_o on real rows, 0 on padding rows
    sum_sq = g.reduce("ReduceSum", g.op("Mul", x, x), last, 1)  # onnxruntime's ReduceSumSquare is 2x slower
    per_row = g.op("Mul", g.op("Concat", own_x, row_max, sum_sq, axis=3), uniform)  # [B, H, Q, 3]
    per_row = g.op("Transpose", per_row, perm=[0, 1, 3, 2])  # [B, H, 3, Q]
    offset = g.op("Sub", k_len, q_len)
    zero_i = g.const([0], np.int64)
    dropped = g.op("Max", g.op("Neg", offset), zero_i)
    kept_rows = g.op("Slice", per_row, dropped, g.op("Add", q_len, k_len), g.const([3], np.int64))
    pads = g.op(
        "Concat", g.const([0, 0, 0], np.int64), g.op("Max", offset, zero_i), g.const([0, 0, 0, 0], np.int64), axis=0
    )
    own_cols = g.op("Pad", kept_rows, pads)  # [B, H, 3, K]
    own_features = g.op(
        "Reshape",
        g.op("Transpose", own_cols, perm=[0, 2, 1, 3]),
        g.op("Concat", g.op("Slice", shape, zero_i, g.const([1], np.int64)), g.const([-1], np.int64), k_len, axis=0),
    )  # [B, 3H, K]: feature-major, then head

    # [B, 6H, K] -> [B, K, 6H]: feature f of head h at f * H + h, as spec.py lays it out.
    features = g.op("Transpose", g.op("Concat", mass, peak, top, own_features, axis=1), perm=[0, 2, 1])

    hidden = g.op("Relu", g.op("Add", g.op("MatMul", features, w1), b1))
    score = g.op("Add", g.op("MatMul", hidden, w2), b2)
    threshold = g.op("Constant")
    g.nodes[-1].attribute.append(
        onnx.AttributeProto(name="value_float", ref_attr_name="threshold", type=onnx.AttributeProto.FLOAT)
    )
    attended = g.op("Greater", g.reduce("ReduceMax", col_rows_raw, heads, 0), zero)  # [B, K]
    g.nodes.append(helper.make_node("And", [g.op("Greater", score, threshold), attended], [flags_out], name="flags"))
    g.nodes.append(helper.make_node("Where", [attended, score, g.const(-np.inf)], [scores_out], name="scores"))
    patch = g.op("Or", flags_out, forced)  # [B, K]: forced broadcasts

    # The patch itself runs only when some column is to be patched: a clean input (the common
    # case) then costs the features alone, and is returned as it came.
    any_patch = g.op("Greater", g.reduce("ReduceMax", g.to_float(patch), [0, 1], 0), zero)

    p = NodeBuilder(opset, prefix=f"{SUBGRAPH_PREFIX}patch/")
    p_zero, p_one = p.const(0.0), p.const(1.0)
    # Its own casts: onnxruntime rewrites the outer graph's Casts (drops float->float, fuses
    # Greater+Cast), which it cannot do while a subgraph refers to their outputs.
    x = p.op("Cast", attention, to=TensorProto.FLOAT)
    # Row sums over the patched / kept columns as [Q, K] @ [K, 1] products. Masked entries are 0
    # here (this branch reads the map as declared, so a float16 map's underflows too), so they
    # add nothing; maps with negative, NaN or above-1 entries are not probabilities, and only there
    # may this differ from the reference (zeroing them would cost a pass over every patched map).
    # Arithmetic instead of Where over the map: onnxruntime's broadcasting Where took 4 ms a pass on
    # a [1, 12, 512, 512] map, three quarters of this branch (profiled), against ~0.5 ms for a Mul.
    patch_f = p.to_float(patch)
    patch_col = p.op("Unsqueeze", patch_f, p.const([1, 3], np.int64))  # [B, 1, K, 1]
    patch_key = p.op("Unsqueeze", patch_f, p.const([1, 2], np.int64))  # [B, 1, 1, K]
    valid_f = p.to_float(valid)
    n_hit = p.op("MatMul", valid_f, patch_col)  # [B, H, Q, 1]
    kept_sum = p.op("MatMul", x, p.op("Sub", p_one, patch_col))
    n_kept = p.op("Sub", row_support, n_hit)
    change = p.op("And", p.op("Greater", n_hit, p_zero), p.op("Greater", n_kept, p_zero))
    change_f = p.to_float(change)
    # The benign value, the smallest kept entry: every other entry is lifted by 2 or 4 (above any
    # probability), a kept one by exactly 0 (-2 + 2), so the minimum is a kept entry as it is.
    two = p.const(2.0)
    lift = p.op("Add", p.op("Mul", valid_f, p.const(-2.0)), p.op("Add", p.op("Mul", patch_key, two), two))
    benign = p.reduce("ReduceMin", p.op("Add", x, lift), last, 1)
    total = p.op("Add", kept_sum, p.op("Mul", n_hit, benign))
    # Patched entries m / total, the others a / total (masked: 0), as the reference computes them; a row
    # that does not change keeps every entry and is divided by 1, so it comes out bit-identical.
    keep = p.op("Max", p.op("Sub", p_one, patch_key), p.op("Sub", p_one, change_f))  # [B, H, Q, K]
    hit_value = p.op("Mul", p.op("Mul", valid_f, patch_key), p.op("Mul", benign, change_f))
    numerator = p.op("Max", p.op("Mul", x, keep), hit_value)
    patched = p.op("Div", numerator, p.op("Where", change, total, p_one))
    p.op("CastLike", patched, attention)
    then_branch = helper.make_graph(p.nodes, "patch", [], [onnx.ValueInfoProto(name=p.nodes[-1].output[0])])
    # onnxruntime refuses a branch that returns an outer value as it is, so this Identity copies the map:
    # about a tenth of the function's time on a clean input (profiled). A ScatterND of nothing onto the
    # map, the other way to hand it on, copied it too.
    unchanged = f"{SUBGRAPH_PREFIX}pass_through"
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [attention], [unchanged], name=unchanged)],
        "pass_through",
        [],
        [onnx.ValueInfoProto(name=unchanged)],
    )
    g.nodes.append(
        helper.make_node(
            "If", [any_patch], [patched_out], name="patch", then_branch=then_branch, else_branch=else_branch
        )
    )

    # map_type is declared for the kernels: the body reads the same from its input's declared type.
    defaults = [helper.make_attribute(name, default) for name, (_, default) in spec.ATTRIBUTES.items()]
    function = helper.make_function(
        spec.DOMAIN,
        spec.OP_TYPE,
        list(spec.INPUTS),
        list(spec.OUTPUTS),
        g.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[],
    )
    function.attribute_proto.extend(defaults)
    function.doc_string = "AtPatch: hot-fix over-attention (see atpatch/ops/spec.py)."
    return function

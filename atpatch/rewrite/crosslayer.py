"""Cross-layer patching: a position flagged in any layer is patched in every layer.

A trigger's key column often looks anomalous only in middle or late layers, after the earlier
layers have already spread its effect into every token; patching it only where it is flagged
comes too late. So the patched graph runs in two passes:

  pass 1   the model with each layer's AtPatch patching what it flags itself (plus `forced`:
           nothing for an encoder, the positions flagged at earlier steps for a KV-cache decoder);
           each AtPatch also reports its flags.
  union    the positions flagged in any layer, per input (an encoder's is built inside pass 2's
           branch, which alone reads it: before the `If` runs only "is anything flagged").
  pass 2   only when some input has a newly flagged position (`If`): the part of the graph
           downstream of the first AtPatch runs again, every AtPatch forced to patch the union;
           inputs with a new flag take pass 2's outputs, the others keep pass 1's.

With the effect check (confirm.py), inputs nothing flags but the check tries take pass 2 as well,
and keep its outputs only where their predicted class changes.

Inputs with nothing flagged (the common case) run once and are bit-identical to the original.
Pass 2 refers to the outer graph's weights and to what is upstream of the patches (the
embeddings), so the file does not double in size. It computes its own first-layer map, shape
computations and shape constants (shape_only.py): read by the `If`, pass 1's map would be copied
rather than patched in place, and pass 1's shape nodes left unmerged by onnxruntime. Decoders carry the flagged
positions to later generation steps as a state beside the KV cache (`past_atpatch_flags` in,
`present_atpatch_flags` out, bool [batch, positions]).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops import spec
from ..ops.builder import NodeBuilder
from ..ops.joint import Confirm, JointRule
from .confirm import FLAGGED_ROWS, candidates, classifier_output, kept_rows
from .graph_walk import rename_inputs, rename_outputs_inside, subgraphs, uses
from .positions import WORD_PIECES, is_patch_grid, joint_flags, whole_words, word_ids
from .positions import spread as widen
from .shape_only import shape_only_producers, small_initializers
from .weight_aliases import weight_aliases

__all__ = [
    "FORCED_INPUT",
    "add_cross_layer",
    "PAST_FLAGS",
    "PRESENT_FLAGS",
    "JOINT",
    "PASS1",
    "PASS2",
    "ROWS",
    "SECOND_PASS",
    "UNION",
    "add_second_pass",
    "pass1_forced",
]

SECOND_PASS = "atpatch/second_pass"  # the If node
UNION = "atpatch/union"  # bool [B, K]: what pass 2 patches: flagged in any layer (or forced), check candidates, spread
ROWS = "atpatch/second_pass_rows"  # bool [B]: inputs that take pass 2's outputs
JOINT = "atpatch/joint_flags"  # bool [B, K]: what the joint rule over layers flags (ops/joint.py), when it is on
PAST_FLAGS = "past_atpatch_flags"  # decoder state in: bool [B, past]
PRESENT_FLAGS = "present_atpatch_flags"  # decoder state out: bool [B, past + new]
FORCED_INPUT = "atpatch_forced"  # optional graph input: bool [B, K], positions to patch in every layer
PASS2 = "atpatch/pass2/"  # what pass 2's copies of tensor and node names start with
PASS1 = "atpatch/pass1/"
_NOTHING = "atpatch/nothing_forced"


def pass1_forced(
    graph: onnx.GraphProto, first_tap: str, decoder: bool, forced_input: bool, opset: int
) -> tuple[str, list[onnx.NodeProto]]:
    """The `forced` input of pass 1's AtPatch nodes, and the nodes computing it (to be placed after
    `first_tap`'s producer): nothing ([1, 1] False), the positions flagged at earlier decoding steps
    (False for the new ones), and/or the `atpatch_forced` graph input. Adds the graph inputs it reads."""
    b = NodeBuilder(opset, "atpatch/forced/")
    parts = []
    if decoder:
        # An input with a default (an initializer of the same name): a caller that does not feed the
        # state gets [1, 0], nothing flagged before, and cross-layer patching within each step.
        graph.input.append(helper.make_tensor_value_info(PAST_FLAGS, TensorProto.BOOL, ["batch", "past_sequence"]))
        graph.initializer.append(numpy_helper.from_array(np.zeros((1, 0), np.bool_), PAST_FLAGS))
        shape = b.op("Shape", first_tap)
        batch = b.op("Slice", shape, b.const([0], np.int64), b.const([1], np.int64))
        keys = b.op("Slice", shape, b.const([3], np.int64), b.const([4], np.int64))
        past = b.op("Slice", b.op("Shape", PAST_FLAGS), b.const([1], np.int64), b.const([2], np.int64))
        before = b.op("Expand", PAST_FLAGS, b.op("Concat", batch, past, axis=0))
        new = b.op("ConstantOfShape", b.op("Concat", batch, b.op("Sub", keys, past), axis=0),
                   value=numpy_helper.from_array(np.zeros(1, np.bool_)))  # fmt: skip
        parts.append(b.op("Concat", before, new, axis=1))
    if forced_input:
        graph.input.append(helper.make_tensor_value_info(FORCED_INPUT, TensorProto.BOOL, ["batch", "key_positions"]))
        parts.append(FORCED_INPUT)
    if not parts:
        graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1), np.bool_), _NOTHING))
        return _NOTHING, []
    return parts[0] if len(parts) == 1 else b.op("Or", *parts), b.nodes


def _batch_dims(graph: onnx.GraphProto) -> set[str]:
    initializers = {t.name for t in graph.initializer}
    dims = set()
    for value in graph.input:
        shape = value.type.tensor_type.shape
        if value.name not in initializers and value.type.HasField("tensor_type") and len(shape.dim) > 0:
            d = shape.dim[0]
            if d.HasField("dim_param"):
                dims.add(d.dim_param)
    return dims


def _batch_first(value: onnx.ValueInfoProto, batch_dims: set[str]) -> int | None:
    """The rank of a graph output whose first axis is the batch, else None."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    if len(dims) == 0 or not dims[0].HasField("dim_param") or dims[0].dim_param not in batch_dims:
        return None
    return len(dims)


def _with_shape_inputs(
    graph: onnx.GraphProto, copied: list[onnx.NodeProto], tainted: set[str], forced: str
) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """`copied` plus the shape-only nodes and shape constants (shape_only.py) it reads from outside,
    so that pass 2 has its own and onnxruntime can still merge pass 1's; in graph order, the
    constants first, one Constant node per distinct value. Also: each constant's name -> the name
    of the Constant node holding its value."""
    producers, constants = shape_only_producers(graph), small_initializers(graph)
    extra: dict[int, onnx.NodeProto] = {}
    held: dict[bytes, onnx.NodeProto] = {}
    aliases: dict[str, str] = {}
    pending = [name for node in copied for name in uses(node) - tainted - {forced}]  # pass 2 forces UNION
    while pending:
        name = pending.pop()
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            value = next(a.t for a in node.attribute if a.name == "value")
        else:
            value = constants.get(name)
        if node is not None and value is None and id(node) not in extra:
            extra[id(node)] = node
            pending.extend(i for i in node.input if i)
        elif value is not None and name not in aliases:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = ""
            key = tensor.SerializeToString()
            if key not in held:
                held[key] = helper.make_node("Constant", [], [f"atpatch/shape_constant/{len(held)}"], value=tensor)
            aliases[name] = held[key].output[0]
    chosen = {id(n) for n in copied} | set(extra)
    return [*held.values(), *(n for n in graph.node if id(n) in chosen)], aliases


def add_second_pass(
    graph: onnx.GraphProto,
    patch_nodes: list[onnx.NodeProto],
    forced: str,
    decoder: bool,
    opset: int,
    spread: int = 0,
    grid: bool = False,
    joint: JointRule | None = None,
    words: np.ndarray | None = None,
    confirm: Confirm | None = None,
) -> None:
    """Add the union of flags, pass 2 inside an `If`, and the per-input choice of outputs (module docstring).

    `patch_nodes` are pass 1's AtPatch nodes, already in `graph` (their outputs: patched, flags,
    scores). `joint` adds the positions one score over all layers flags (ops/joint.py) to the union.
    `spread` > 0 widens what pass 2 patches by that many positions around each flagged one (along
    the sequence, or on the patch grid with `grid`): a trigger spanning several positions is often
    flagged at one of them only. `words` (ops/words.py's table) widens it to whole words, where the
    graph has token ids (positions.word_ids). `confirm` adds the effect check's candidates (confirm.py).
    """
    if confirm is not None and decoder:
        raise ValueError("the effect check (Confirm) needs a classifier: a decoder's steps have no class to check")
    logits = None if confirm is None else classifier_output(list(graph.output), _batch_dims(graph))
    if confirm is not None and logits is None:
        raise ValueError("the effect check (Confirm) needs the model to output a classifier's logits [batch, classes]")
    b = NodeBuilder(opset, "atpatch/crosslayer/")
    # An encoder has nothing forced: every flag is new, and neither `forced` nor its Not is needed.
    # Its union of flags is built inside pass 2's branch, which alone reads it: an input nothing
    # flags then runs a Concat, a Cast, a ReduceMax and a Greater before the If, whatever the number
    # of layers (an Or per layer, two reductions and any widening before, 8-11 nodes on the small
    # models, each about a microsecond on a 0.2-0.5 ms model). A decoder's union is its next step's
    # state, needed on every run.
    nothing = forced == _NOTHING
    u = NodeBuilder(opset, "atpatch/crosslayer/pass2/") if nothing else b  # what pass 2 alone reads
    flags = [node.output[1] for node in patch_nodes]
    if joint is not None:
        joint_flags(b, [node.output[2] for node in patch_nodes], joint, grid)
        b.nodes[-1].output[0] = JOINT
        b.nodes[-1].name = JOINT
        flags.append(JOINT)
    flagged_rows = ROWS if confirm is None else FLAGGED_ROWS  # with the check, ROWS is chosen in pass 2
    if nothing:
        hits = b.to_float(flags[0] if len(flags) == 1 else b.op("Concat", *flags, axis=1))  # [B, layers * K]
        rows_at = u if confirm is None else b  # the check's candidates (pass 1) leave out flagged rows
        rows_at.any_positive(hits, [1])
        rows_at.nodes[-1].output[0] = rows_at.nodes[-1].name = flagged_rows
        union, *rest = flags
    else:
        union, *rest = [forced, *flags]
    for layer_flags in rest:
        union = u.op("Or", union, layer_flags)
    if not nothing:
        b.any(b.op("And", union, b.op("Not", forced)), [1])
        b.nodes[-1].output[0] = b.nodes[-1].name = flagged_rows
    if confirm is None:
        any_new = b.any_positive(hits, [0, 1]) if nothing else b.any(ROWS, [0])
    else:
        assert logits is not None
        tried, positions = candidates(
            b, [node.output[2] for node in patch_nodes], confirm, grid, flagged_rows, PASS1 + logits, u
        )
        union = u.op("Or", union, positions)
        any_new = b.any(b.op("Or", flagged_rows, tried), [0])
    if spread > 0:
        union = widen(u, union, spread, grid)
    if words is not None and (ids := word_ids(graph, opset, decoder)) is not None:
        graph.initializer.append(numpy_helper.from_array(np.asarray(words, np.uint8), WORD_PIECES))
        union = whole_words(u, union, ids, len(words))
    u.nodes.append(helper.make_node("Identity", [union], [UNION], name=UNION))
    in_pass2 = u.nodes if u is not b else []

    # What pass 2 recomputes: every AtPatch, and everything downstream of a patched map. Also the
    # producer of a map no patch changed (the first layer's softmax): read by pass 2 as well, pass
    # 1's map would have two readers, and onnxruntime then copies it instead of patching in place.
    patched = {n.output[0] for n in patch_nodes}
    taps = {n.input[0] for n in patch_nodes}
    tainted = set(patched)
    copied: list[onnx.NodeProto] = []
    for node in graph.node:
        is_patch = node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE
        if is_patch or uses(node) & tainted:
            copied.append(node)
            tainted.update(o for o in node.output if o)
        elif taps & set(node.output):
            copied.append(node)
    copied, constants = _with_shape_inputs(graph, copied, tainted, forced)
    outputs = [o for o in graph.output if o.name in tainted]
    if not outputs:
        graph.node.extend([*b.nodes, *in_pass2])
        return

    # The affected graph outputs become the If's: pass 1 produces them under new names.
    rename1 = {o.name: PASS1 + o.name for o in outputs}
    for node in graph.node:
        for k, out in enumerate(node.output):
            if out in rename1:
                node.output[k] = rename1[out]
    rename_inputs(graph.node, rename1)
    for value in graph.value_info:
        value.name = rename1.get(value.name, value.name)

    branch = NodeBuilder(opset, PASS2 + "select/")
    rename2: dict[str, str] = {}
    body: list[onnx.NodeProto] = []
    for node in copied:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = PASS2 + (node.name or node.output[0])
        for k, out in enumerate(copy.output):
            if out:
                rename2[out] = PASS2 + out
                copy.output[k] = rename2[out]
        for sub in subgraphs(copy):
            rename_outputs_inside(sub, PASS2)
        if node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE:
            copy.input[len(spec.INPUTS) - 1] = UNION
        body.append(copy)
    rename2.update({name: rename2[held] for name, held in constants.items()})
    # Weights by their own names, not through pass 1's Identity aliases (weight_aliases.py).
    rename2.update({alias: weight for alias, weight in weight_aliases(graph).items() if alias not in rename2})
    rename_inputs(body, rename2)
    if confirm is not None:
        assert logits is not None
        if logits not in rename1:
            raise ValueError(f"the effect check (Confirm) needs logits that the attention changes; {logits} does not")
        first_logits = rename1[logits]
        kept_rows(branch, confirm, FLAGGED_ROWS, first_logits, rename2[first_logits], ROWS)

    batch_dims = _batch_dims(graph)
    then_out, else_out, else_nodes = [], [], []
    for value in outputs:
        first = rename1[value.name]
        second = rename2[first]
        rank = _batch_first(value, batch_dims)
        if rank is not None:
            shape = branch.const([-1] + [1] * (rank - 1), np.int64)
            second = branch.op("Where", branch.op("Reshape", ROWS, shape), second, first)
        typed = onnx.ValueInfoProto()
        typed.CopyFrom(value)
        typed.name = second
        then_out.append(typed)
        else_name = f"atpatch/pass1_kept/{value.name}"
        else_nodes.append(helper.make_node("Identity", [first], [else_name], name=else_name))
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(value)
        kept.name = else_name
        else_out.append(kept)
    then_branch = helper.make_graph([*in_pass2, *body, *branch.nodes], "atpatch_pass2", [], then_out)
    # Pass 2's maps get the shapes patch_model declared for pass 1's (the same: same inputs, same
    # ops), so that onnxruntime lets the kernel patch them in place there too (insert.py).
    maps = {name for node in patch_nodes for name in (node.input[0], *node.output)}
    for value in graph.value_info:
        if value.name in maps and value.name in rename2:
            then_branch.value_info.add(name=rename2[value.name]).type.CopyFrom(value.type)
    else_branch = helper.make_graph(else_nodes, "atpatch_pass1", [], else_out)
    second_pass = helper.make_node(
        "If",
        [any_new],
        [o.name for o in outputs],
        name=SECOND_PASS,
        then_branch=then_branch,
        else_branch=else_branch,
    )
    graph.node.extend([*b.nodes, second_pass])
    if decoder:
        graph.node.append(helper.make_node("Identity", [UNION], [PRESENT_FLAGS], name=PRESENT_FLAGS))
        graph.output.append(helper.make_tensor_value_info(PRESENT_FLAGS, TensorProto.BOOL, ["batch", "total_sequence"]))


def add_cross_layer(
    model: onnx.ModelProto,
    spread: int = 0,
    joint: JointRule | None = None,
    words: np.ndarray | None = None,
    confirm: Confirm | None = None,
) -> None:
    """Give a per-layer patched `model` (patch_model(..., cross_layer=False)) its second pass, in place.

    Separate from patching so that graph passes that cannot see into an `If` (onnxruntime's
    transformer fusions) can run in between.
    """
    graph = model.graph
    nodes = [n for n in graph.node if n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE]
    if any(n.op_type == "If" and n.name == SECOND_PASS for n in graph.node):
        raise ValueError("the model already has cross-layer patching")
    if len(nodes) < 2 and not spread and joint is None and words is None and confirm is None:  # pass 2 = pass 1
        return
    opset = next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inputs = {value.name for value in graph.input}
    decoder, grid = PAST_FLAGS in inputs, is_patch_grid(inputs)
    forced = nodes[0].input[len(spec.INPUTS) - 1]
    add_second_pass(graph, nodes, forced, decoder, opset, spread, grid, joint, words, confirm)
    for prop in model.metadata_props:
        if prop.key == "atpatch.cross_layer":
            prop.value = "1"

"""Patching a > 2 GB model with external data: peak memory of `atpatch-export`, against the model's size.

    python benchmarks/large_model.py              # ~2.3 GB BERT-like model (11 x 2048), a few minutes
    python benchmarks/large_model.py --naive      # also time the load-everything way, for contrast
    python benchmarks/large_model.py --layers 2   # a quick smaller run (not > 2 GB)

A BERT-like encoder (TorchScript-style eager attention: MatMul, scale, mask Add, Softmax over
the key axis, MatMul with V) is synthesised straight into ONNX with random weights written
chunk by chunk to one side file, so the generator never holds a weight matrix whole. The CLI
patches it in a subprocess whose peak RSS comes from os.wait4; the goal is < 1.5x the model's
size. Then the original and patched models run in onnxruntime on a small input (pass-through:
outputs must be bit-identical) and the input files are checked unchanged by SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GOAL = 1.5  # peak RSS of the patch / model size
CHUNK = 4 * 1024 * 1024  # floats per generated chunk (16 MiB)


class _Weights:
    """Initializers whose random values go straight to one side file, chunk by chunk."""

    def __init__(self, data_path: Path, seed: int) -> None:
        self.file = open(data_path, "wb")  # noqa: SIM115 - closed by close()
        self.location = data_path.name
        self.rng = np.random.default_rng(seed)
        self.tensors: list[TensorProto] = []

    def add(self, name: str, shape: tuple[int, ...], scale: float, mean: float = 0.0) -> str:
        offset = self.file.tell()
        left = math.prod(shape)
        while left:
            n = min(CHUNK, left)
            (self.rng.standard_normal(n, dtype=np.float32) * scale + mean).astype(np.float32).tofile(self.file)
            left -= n
        tensor = TensorProto(name=name, dims=shape, data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", offset), ("length", self.file.tell() - offset)):
            tensor.external_data.add(key=key, value=str(value))
        self.tensors.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


def synthesize(folder: Path, layers: int, hidden: int, heads: int, vocab: int, seed: int = 0) -> Path:
    """Write model.onnx + model.onnx.data: a BERT-like encoder, weights on disk only."""
    path = folder / "model.onnx"
    w = _Weights(folder / "model.onnx.data", seed)
    nodes: list[onnx.NodeProto] = []
    consts: list[TensorProto] = []
    head_dim, ffn = hidden // heads, 4 * hidden

    def const(name: str, value: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def layer_norm(x: str, prefix: str) -> str:
        gamma = const(f"{prefix}.gamma", np.ones(hidden, np.float32))
        beta = const(f"{prefix}.beta", np.zeros(hidden, np.float32))
        return node("LayerNormalization", [x, gamma, beta], f"{prefix}/LayerNorm", axis=-1, epsilon=1e-12)

    def dense(x: str, prefix: str, n_in: int, n_out: int) -> str:
        weight = w.add(f"{prefix}.weight", (n_in, n_out), scale=0.02)
        bias = const(f"{prefix}.bias", np.zeros(n_out, np.float32))
        return node("Add", [node("MatMul", [x, weight], f"{prefix}/MatMul"), bias], f"{prefix}/Add")

    heads_shape = const("shape.heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("shape.merge", np.array([0, 0, hidden], np.int64))
    scale = const("attention.scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    one = const("one", np.array(1.0, np.float32))
    big_negative = const("mask.fill", np.array(-10000.0, np.float32))
    half, root2 = const("half", np.array(0.5, np.float32)), const("sqrt2", np.array(math.sqrt(2.0), np.float32))

    x = node("Gather", [w.add("embeddings.word", (vocab, hidden), scale=0.02), "input_ids"], "embeddings/Gather")
    x = layer_norm(x, "embeddings")
    mask = node("Unsqueeze", ["attention_mask", const("axes12", np.array([1, 2], np.int64))], "mask/Unsqueeze")
    mask = node("Cast", [mask], "mask/Cast", to=TensorProto.FLOAT)
    mask = node("Mul", [node("Sub", [one, mask], "mask/Sub"), big_negative], "mask/Mul")
    for i in range(layers):
        p = f"layer.{i}"
        q, k, v = (dense(x, f"{p}.attention.{n}", hidden, hidden) for n in "qkv")
        q = node("Transpose", [node("Reshape", [q, heads_shape], f"{p}/q/Reshape")], f"{p}/q/T", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, heads_shape], f"{p}/k/Reshape")], f"{p}/k/T", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, heads_shape], f"{p}/v/Reshape")], f"{p}/v/T", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{p}/QK/MatMul"), scale], f"{p}/scale/Mul")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}/mask/Add")], f"{p}/Softmax", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{p}/PV/MatMul")], f"{p}/ctx/T", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"{p}/ctx/Reshape")
        x = layer_norm(node("Add", [x, dense(ctx, f"{p}.attention.out", hidden, hidden)], f"{p}/res1"), f"{p}.ln1")
        h = dense(x, f"{p}.ffn.in", hidden, ffn)
        erf = node("Erf", [node("Div", [h, root2], f"{p}/gelu/Div")], f"{p}/gelu/Erf")
        h = node(
            "Mul", [node("Mul", [h, half], f"{p}/gelu/Mul0"), node("Add", [erf, one], f"{p}/gelu/Add")], f"{p}/gelu"
        )
        x = layer_norm(node("Add", [x, dense(h, f"{p}.ffn.out", ffn, hidden)], f"{p}/res2"), f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    w.close()

    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")
    ]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])]
    graph = helper.make_graph(nodes, "bert_like", inputs, outputs, [*w.tensors, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save_model(model, str(path))  # the weights are references already: a small file
    onnx.checker.check_model(str(path))
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def run_measured(argv: list[str]) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in bytes, wall seconds, output) of a subprocess, RSS from its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024.0, time.perf_counter() - start, out


_NAIVE = """
import sys, onnx
from atpatch.rewrite import patch_model
model = onnx.load(sys.argv[1])  # every weight in memory
patched, _ = patch_model(model)
onnx.save_model(patched, sys.argv[2], save_as_external_data=True, location="naive.onnx.data")
"""

_RUN = """
import sys, numpy as np, onnxruntime as ort
from atpatch.runtime import create_session
feeds = dict(np.load(sys.argv[1]))
original = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"]).run(None, feeds)[0]
patched = create_session(sys.argv[3]).run(None, feeds)[0]
np.savez(sys.argv[4], original=original, patched=patched)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=11)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    p.add_argument("--naive", action="store_true", help="also patch by loading every weight (onnx.load), for contrast")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="atpatch-large-", dir=args.dir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        model = synthesize(folder, args.layers, args.hidden, args.heads, args.vocab)
        size = model.stat().st_size + (folder / "model.onnx.data").stat().st_size
        print(
            f"synthesised {args.layers} layers x {args.hidden} ({args.heads} heads): {size / 1e9:.2f} GB "
            f"({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s"
        )
        before = {f.name: sha256(f) for f in sorted(folder.iterdir())}

        rows = []
        out = folder / "out" / "model.patched.onnx"
        out.parent.mkdir()
        cli = [sys.executable, "-c", "import sys; from atpatch.cli import export_main; sys.exit(export_main())"]
        code, rss, wall, text = run_measured([*cli, str(model), "-o", str(out)])
        if code != 0:
            print(text)
            return 1
        print(text.strip())
        rows.append(("atpatch-export (weights stay on disk)", rss, wall))
        floor_code, floor_rss, _, _ = run_measured([sys.executable, "-c", "import onnx, onnxruntime, atpatch.jobs"])
        if args.naive:
            naive = folder / "naive" / "naive.onnx"
            naive.parent.mkdir()
            code, n_rss, n_wall, text = run_measured([sys.executable, "-c", _NAIVE, str(model), str(naive)])
            rows.append(("naive: onnx.load + patch + save" + ("" if code == 0 else " (FAILED)"), n_rss, n_wall))
            if code != 0:
                print(text.strip().splitlines()[-1])

        unchanged = before == {f.name: sha256(f) for f in sorted(folder.iterdir()) if f.is_file()}
        patched_files = {f.name: f.stat().st_size for f in out.parent.iterdir()}
        patched_graph = onnx.load(str(out), load_external_data=False)
        atpatch_nodes = sum(n.op_type == "AtPatch" for n in patched_graph.graph.node)

        rng = np.random.default_rng(1)
        feeds = {"input_ids": rng.integers(0, args.vocab, (2, 16)), "attention_mask": np.ones((2, 16), np.int64)}
        feeds["attention_mask"][1, 11:] = 0
        np.savez(folder / "feeds.npz", **feeds)
        code, run_rss, run_wall, text = run_measured(
            [sys.executable, "-c", _RUN, str(folder / "feeds.npz"), str(model), str(out), str(folder / "outs.npz")]
        )
        if code != 0:
            print(text)
            return 1
        outs = np.load(folder / "outs.npz")
        identical = np.array_equal(outs["original"], outs["patched"]) and np.isfinite(outs["patched"]).all()

    print()
    print(f"{'patch':<40} | model GB | peak RSS GB | RSS / model | wall s")
    print("-" * 86)
    for name, peak, seconds in rows:
        print(f"{name:<40} | {size / 1e9:8.2f} | {peak / 1e9:11.2f} | {peak / size:10.2f}x | {seconds:6.1f}")
    print(f"(a bare `import onnx, onnxruntime, atpatch.jobs` peaks at {floor_rss / 1e9:.2f} GB RSS)")
    print()
    print(
        f"patched files: {', '.join(f'{k} {v / 1e9:.3f} GB' for k, v in sorted(patched_files.items()))}; "
        f"{atpatch_nodes} AtPatch nodes"
    )
    print(f"input files unchanged (SHA-256 before/after): {unchanged}")
    print(
        f"onnxruntime, batch 2 x 16 tokens (one padded): original vs patched (pass-through) "
        f"{'bit-identical' if identical else 'DIFFERENT'}; both runs peaked at {run_rss / 1e9:.2f} GB RSS, "
        f"{run_wall:.0f} s"
    )
    met = rows[0][1] / size < GOAL
    print(f"goal: peak RSS < {GOAL}x model size: {'met' if met else 'MISSED'} ({rows[0][1] / size:.2f}x)")
    return 0 if met and unchanged and identical and size > 0 and floor_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""One com.microsoft::GroupQueryAttention node, as onnxruntime-genai's builder wires it, and a decode loop.

`GqaCase` builds the single-node graph (packed or separate Q/K/V, KV cache grown each step or a
fixed buffer shared by past and present, rotary caches) and `run_steps` feeds it a prompt and
decoding steps the way genai does: seqlens_k = total length - 1 per row, total_sequence_length =
the longest, present fed back as past.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

MS = "com.microsoft"


@dataclass(frozen=True)
class GqaCase:
    heads: int = 4
    kv_heads: int = 2
    head_size: int = 16
    packed: bool = True
    cache: str = "grow"  # "grow": past is [B, Hkv, past, D]; "shared": a fixed [B, Hkv, max_len, D] buffer; "none"
    rotary: bool = True
    interleaved: bool = False
    rotary_dim: int | None = None  # None: the whole head
    window: int = -1
    softcap: float = 0.0
    scale: float = 0.0
    max_len: int = 32
    extra: dict[str, object] = field(default_factory=dict)  # more attributes
    past_names: tuple[str, str] = ("past_k", "past_v")  # genai's: past_key_values.0.key/value

    def model(self) -> onnx.ModelProto:
        hq, hkv, d = self.heads * self.head_size, self.kv_heads * self.head_size, self.head_size
        f, i32 = TensorProto.FLOAT, TensorProto.INT32
        inputs = [helper.make_tensor_value_info("query", f, ["B", "S", hq + 2 * hkv if self.packed else hq])]
        names = ["query", "", ""]
        if not self.packed:
            inputs += [helper.make_tensor_value_info(n, f, ["B", "S", hkv]) for n in ("key", "value")]
            names = ["query", "key", "value"]
        if self.cache != "none":
            inputs += [helper.make_tensor_value_info(n, f, ["B", self.kv_heads, "P", d]) for n in self.past_names]
            names += list(self.past_names)
        else:
            names += ["", ""]
        inputs += [
            helper.make_tensor_value_info("seqlens_k", i32, ["B"]),
            helper.make_tensor_value_info("total_sequence_length", i32, []),
        ]
        names += ["seqlens_k", "total_sequence_length"]
        inits = []
        if self.rotary:
            half = (self.rotary_dim or d) // 2
            angles = np.outer(np.arange(self.max_len), 1.0 / 10000 ** (np.arange(half) / half))
            inits = [
                onnx.numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos_cache"),
                onnx.numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin_cache"),
            ]
            names += ["cos_cache", "sin_cache"]
        attrs = {
            "num_heads": self.heads,
            "kv_num_heads": self.kv_heads,
            "scale": self.scale,
            "local_window_size": self.window,
            "softcap": self.softcap,
            "do_rotary": int(self.rotary),
            "rotary_interleaved": int(self.interleaved),
            **self.extra,
        }
        node = helper.make_node(
            "GroupQueryAttention", names, ["y", "present_k", "present_v"], name="layer0/GQA", domain=MS, **attrs
        )
        outputs = [helper.make_tensor_value_info("y", f, ["B", "S", hq])] + [
            helper.make_tensor_value_info(n, f, ["B", self.kv_heads, "T", d]) for n in ("present_k", "present_v")
        ]
        graph = helper.make_graph([node], "gqa", inputs, outputs, inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=9
        )
        onnx.checker.check_model(model)
        return model

    def feeds(self, rng: np.random.Generator, x_len: int, totals: list[int], past: tuple | None) -> dict:
        """Inputs for `x_len` new tokens per row, rows' total lengths `totals` (past included)."""
        batch, d = len(totals), self.head_size
        hq, hkv = self.heads * d, self.kv_heads * d
        out: dict[str, np.ndarray] = {}
        if self.packed:
            out["query"] = rng.standard_normal((batch, x_len, hq + 2 * hkv)).astype(np.float32)
        else:
            out["query"] = rng.standard_normal((batch, x_len, hq)).astype(np.float32)
            out["key"] = rng.standard_normal((batch, x_len, hkv)).astype(np.float32)
            out["value"] = rng.standard_normal((batch, x_len, hkv)).astype(np.float32)
        if self.cache != "none":
            empty = np.zeros((batch, self.kv_heads, self.max_len if self.cache == "shared" else 0, d), np.float32)
            out[self.past_names[0]], out[self.past_names[1]] = past if past is not None else (empty, empty)
        out["seqlens_k"] = np.array(totals, np.int32) - 1
        out["total_sequence_length"] = np.array(max(totals), np.int32)
        return out


Runner = Callable[[dict], list[np.ndarray]]


def run_steps(
    case: GqaCase,
    runners: list[Runner],
    prompt: int,
    steps: int,
    batch: int = 1,
    seed: int = 0,
    lag: int = 0,
    extra_feeds: Callable[[dict], dict] | None = None,
) -> list[list[list[np.ndarray]]]:
    """Outputs of each runner for a prompt then `steps` one-token steps, each runner fed its own present.

    `lag` > 0 makes the last row's sequence that many tokens shorter from the first decoding
    step on (genai's rows of different lengths): its seqlens_k is smaller, its cache right-padded.
    `extra_feeds` adds inputs computed from each step's (e.g. atpatch_forced).
    """
    rng = np.random.default_rng(seed)
    results: list[list[list[np.ndarray]]] = [[] for _ in runners]
    pasts: list[tuple | None] = [None for _ in runners]
    totals = [prompt] * batch
    x_len = prompt
    for step in range(steps + 1):
        feeds = case.feeds(rng, x_len, totals, None)
        if extra_feeds is not None:
            feeds.update(extra_feeds(feeds))
        for r, run in enumerate(runners):
            mine = dict(feeds)
            if case.cache != "none" and pasts[r] is not None:
                mine[case.past_names[0]], mine[case.past_names[1]] = pasts[r]
            outs = run(mine)
            results[r].append(outs)
            if case.cache != "none":
                pasts[r] = (outs[1], outs[2])
        if case.cache == "none":
            break
        totals = [t + 1 for t in totals]
        if step == 0 and lag and batch > 1:
            totals[-1] -= lag
        x_len = 1
    return results

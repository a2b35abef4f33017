"""onnxruntime-genai decoders (GroupQueryAttention in every layer), built by genai's own builder.

For tiny random Llama, Qwen2 and Phi-3 (fp32, CPU; tests/genai_models.py):
  - onnxruntime on the decomposed decoder equals onnxruntime on genai's fused decoder, logits and
    present K/V, over the prompt and 8 greedy steps (a plain onnxruntime loop, KV cache grown);
  - `atpatch-export FOLDER -o NEW` writes a folder that genai's own loop (og.Model, og.Generator,
    its genai_config.json: a KV buffer shared by past and present) runs, with a pass-through patch
    giving the unpatched model's greedy tokens and logits;
  - with a detector that flags, genai's loop generates the tokens of the same Hugging Face model in
    PyTorch with each softmax patched by the numpy reference, cross-layer, step by step without
    carrying flags (genai never feeds the flag state back).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from genai_models import BOS, EOS, FAMILIES, HEAD_SIZE, HEADS, KV_HEADS, build_genai
from torch_reference import cross_layer_generate, peak_detector, robust_peak_detector

from atpatch.cli import export_main
from atpatch.ops import spec
from atpatch.rewrite import decompose_fused_attention, patch_model
from atpatch.serving.genai import patch_genai_folder

og = pytest.importorskip(
    "onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -c constraints.txt -e '.[genai]')"
)

ATOL = 1e-5
STEPS = 8
PROMPT = [BOS, 5, 17, 33, 2, 90]


@pytest.fixture(scope="module", params=FAMILIES)
def genai_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Weights ten times transformers' default spread, so attention decides the greedy tokens: with the
    # default, patching a column never changed a token of the tiny Llama, and a flag test could not fail.
    return build_genai(request.param, tmp_path_factory.mktemp(request.param), initializer_range=0.2)


def _session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # so nothing is fused back
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _greedy_loop(sessions: list[ort.InferenceSession], prompt: list[int] = PROMPT) -> list[float]:
    """Max |first - other| over logits and present K/V, per step; tokens chosen by the first session."""
    first = sessions[0]
    past_inputs = [i for i in first.get_inputs() if i.name.startswith("past_key_values.")]
    names = [o.name for o in first.get_outputs()]
    empty = np.zeros((1, KV_HEADS, 0, HEAD_SIZE), np.float32)
    pasts = [{i.name: empty for i in past_inputs} for _ in sessions]
    tokens, new = list(prompt), list(prompt)
    diffs = []
    for _ in range(STEPS + 1):
        feeds = {
            "input_ids": np.array([new], np.int64),
            "attention_mask": np.ones((1, len(tokens)), np.int64),
        }
        outs = [
            dict(zip(names, s.run(names, {**feeds, **p}), strict=True)) for s, p in zip(sessions, pasts, strict=True)
        ]
        for other in outs[1:]:
            diffs.append(max(float(np.max(np.abs(outs[0][n] - other[n]))) for n in names))
        for p, out in zip(pasts, outs, strict=True):
            p.update({name: out[name.replace("past_key_values", "present")] for name in p})
        new = [int(np.argmax(outs[0]["logits"][0, -1]))]
        tokens += new
    return diffs


def test_the_decomposed_decoder_equals_genais_fused_one_on_the_prompt_and_8_steps(genai_folder: Path) -> None:
    model = onnx.load(str(genai_folder / "model.onnx"))
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 2
    decomposed, done = decompose_fused_attention(model)
    assert [d.op for d in done] == ["com.microsoft::GroupQueryAttention"] * 2
    patched, sites = patch_model(model)
    assert len(sites) == 2 and all(s.heads == 4 for s in sites)
    assert sum(n.op_type == spec.OP_TYPE for n in patched.graph.node) == 2
    diffs = _greedy_loop([_session(model), _session(decomposed, optimize=False), _session(patched)])
    assert max(diffs) <= ATOL, f"max |fused - explicit| {max(diffs):.2e}"


def _genai_greedy(folder: Path) -> tuple[list[int], list[np.ndarray]]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + STEPS + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], np.int32))
    tokens, logits = [], [generator.get_output("logits")]
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if not generator.is_done():
            logits.append(generator.get_output("logits"))
    return tokens, logits


def test_an_exported_genai_folder_runs_in_genais_own_loop_with_the_same_greedy_tokens(
    genai_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "patched"
    assert export_main([str(genai_folder), "-o", str(out)]) == 0
    assert {p.name for p in genai_folder.iterdir()} == {p.name for p in out.iterdir()}
    patched = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == spec.OP_TYPE for n in patched.graph.node) == 2
    assert not any(n.op_type == "GroupQueryAttention" for n in patched.graph.node)
    want_tokens, want_logits = _genai_greedy(genai_folder)
    got_tokens, got_logits = _genai_greedy(out)
    assert len(want_tokens) == STEPS + 1 and len(set(want_tokens)) > 1
    assert got_tokens == want_tokens
    for want, got in zip(want_logits, got_logits, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def _reference_generate(genai_folder: Path, carry: bool = False) -> object:
    """(detector, seen) -> greedy tokens of the builder's Hugging Face source model in PyTorch (eager),
    each softmax patched by the numpy reference, cross-layer; genai's loop does not carry flags."""
    from atpatch.exporter.families import cache_layout
    from atpatch.exporter.hf import load_hf_model
    from atpatch.exporter.kv_cache import generation_step

    model = load_hf_model(genai_folder.parent / genai_folder.name.replace("genai_", "hf_"), "eager")
    layout = cache_layout(model.config)
    step = generation_step(model, layout)
    empty = [np.zeros((1, layout.kv_heads, 0, layout.head_dim), np.float32) for _ in layout.past_names]
    ids, mask = np.array([PROMPT], np.int64), np.ones((1, len(PROMPT)), np.int64)
    return lambda detector, seen: cross_layer_generate(
        step, detector.layers, ids, mask, empty, STEPS + 1, seen, carry=carry
    )[0].tolist()


def test_a_flagging_detector_changes_genais_tokens_as_the_numpy_reference_says(
    genai_folder: Path, tmp_path: Path
) -> None:
    unpatched, _ = _genai_greedy(genai_folder)
    generate = _reference_generate(genai_folder)
    never = peak_detector(1.5, HEADS, 2)  # no attention exceeds 1: the reference's own pass-through
    assert generate(never, [])[: len(unpatched)] == unpatched
    detector = robust_peak_detector(HEADS, 2, generate, lambda tokens: tokens[: len(unpatched)] != unpatched)
    expected = generate(detector, [])
    patch_genai_folder(genai_folder, tmp_path / "patched", detector)
    got, _ = _genai_greedy(tmp_path / "patched")
    # genai stops at the end-of-sequence token; the reference generates on.
    assert got == expected[: len(got)] and (len(got) == STEPS + 1 or got[-1] == EOS), (got, expected)
    assert got != unpatched
    # The check can tell the two loops apart: atpatch's own loop, which carries flags, goes elsewhere.
    assert _reference_generate(genai_folder, carry=True)(detector, [])[: len(got)] != got


def test_exporting_a_genai_folder_into_itself_is_refused(genai_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert export_main([str(genai_folder), "-o", str(genai_folder / "patched")]) != 0
    assert "is the genai folder or inside it" in capsys.readouterr().err


def test_a_genai_export_that_fails_midway_leaves_no_folder(
    genai_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("atpatch.serving.genai.shutil.copy2", disk_full)  # after the decoder is written
    out = tmp_path / "patched"
    assert export_main([str(genai_folder), "-o", str(out)]) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def _forced_run(session: ort.InferenceSession, every_step: bool, carry: bool) -> list[dict[str, np.ndarray]]:
    """Fixed tokens; position 2 forced at the prompt (or at every step); flags fed back when `carry`."""
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((1, KV_HEADS, 0, HEAD_SIZE), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}  # fmt: skip
    new, total, outs = list(PROMPT), 0, []
    for step in range(STEPS + 1):
        total += len(new)
        forced = np.zeros((1, total), np.bool_)
        forced[0, 2] = step == 0 or every_step
        feeds = {"input_ids": np.array([new], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        feeds |= {**past, "atpatch_forced": forced}
        out = dict(zip(names, session.run(names, feeds), strict=True))
        outs.append(out)
        past = {name: out[name.replace("past_key_values", "present")] for name in past if name != "past_atpatch_flags"}
        if carry:
            past["past_atpatch_flags"] = out["present_atpatch_flags"]
        new = [7 + step]
    return outs


def test_flags_carry_to_later_steps_only_where_the_loop_feeds_them_back(genai_folder: Path) -> None:
    """What genai's loop does to the flag state: it never feeds it, so each step starts from nothing."""
    patched, _ = patch_model(onnx.load(str(genai_folder / "model.onnx")), forced_input=True)
    session = _session(patched)
    carried = _forced_run(session, every_step=False, carry=True)  # atpatch's loop
    forced_each_step = _forced_run(session, every_step=True, carry=False)
    genai_like = _forced_run(session, every_step=False, carry=False)  # genai's loop: state left at its default
    for step, (a, b, c) in enumerate(zip(carried, forced_each_step, genai_like, strict=True)):
        assert a["present_atpatch_flags"][0, 2] and a["present_atpatch_flags"].sum() == 1
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=ATOL)
        gap = float(np.max(np.abs(a["logits"] - c["logits"])))
        assert gap == 0.0 if step == 0 else gap > 1e-4, (step, gap)
        assert bool(c["present_atpatch_flags"][0, 2]) == (step == 0)


def test_phi3_long_rope_past_its_original_length_equals_the_fused_decoder(tmp_path: Path) -> None:
    """Phi-3 128k's layout: an If picks the long or short cos/sin cache by the total length."""
    folder = build_genai("phi3_longrope", tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    assert any(n.op_type == "If" for n in model.graph.node)
    patched, _ = patch_model(model)
    long_prompt = [BOS, *range(1, 70)]  # 70 tokens: past original_max_position_embeddings (64)
    diffs = _greedy_loop([_session(model), _session(patched)], long_prompt)
    assert max(diffs) <= ATOL, f"max |fused - patched| {max(diffs):.2e}"

"""How far could any column detector over the op's features go on a case? A ceiling, not a patch.

The op scores each key column of each layer from its features (ops/spec.py); `atpatch fit` trains
one small MLP per layer and may add the joint rule (a weighted sum of the layers' scores). This
script trains detectors the op cannot carry, to see whether the features, rather than the way
they are combined, limit detection:

  - *all layers, debugging set*: one MLP (64 hidden units) over every layer's features of a column
    at once, trained on the labels `atpatch fit` gets with known positions (the debugging set's
    culprit columns against clean fitting columns);
  - *all layers, half the victims*: the same MLP trained on the culprit columns of half the
    triggered test inputs (hundreds of trigger placements instead of the debugging set's few), then
    measured on the other half: the features' separation when labels are plentiful;
  - *all layers + neighbours*: each of the two, over a column's features beside the elementwise
    max and mean of its neighbours' (the 8 around it on a patch grid, one either side in a
    sequence): whether a trigger that straddles positions is found by looking at them together.

Thresholds come from the calibration set as `atpatch fit` sets them (the most flagged calibration
inputs whose Clopper-Pearson bound stays within the budget, 90% confidence). On the held-out half of
the triggered inputs it reports the triggered inputs with a culprit column flagged and the ASR when
each flagged position and its neighbours (within 1: the 3 x 3 block on a patch grid, one token either
side in a sequence) are patched in every layer, as cross-layer patching would, by
`atpatch.evaluate.oracle_logits` with those positions as the culprits.

    python benchmarks/vision_backdoor.py --trigger random                # first: the case's cache
    python benchmarks/detection_bound.py benchmarks/.cache/vision_backdoor/random-full-seed0
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import casekit  # noqa: E402

RESULTS = casekit.RESULTS / "detection_bound.json"
TITLE = "Experiment: a ceiling for detectors over the op's column features"
BUDGETS = (0.005, 0.01, 0.02, 0.05)
HIDDEN, EPOCHS, SEED = 64, 100, 0
HEADER = (
    "| detector | budget | clean flagged | triggered flagged | culprit flagged | ASR, flags patched "
    "| ASR, flags ±1 patched |"
)
EXPLAINED = (
    "Not a patch: detectors the op cannot carry, to tell whether the column features or the way `atpatch fit` "
    "combines them limit detection (`benchmarks/detection_bound.py`, its docstring says how). One MLP over every "
    "layer's features of a column at once (+ neighbours: beside the max and mean of its neighbours' features), "
    "trained on the debugging set's known culprits, or on the culprits of half the victims; thresholds calibrated "
    "as `atpatch fit` does. Rates and ASRs on the other half of the "
    "victims (clean flagged: the clean test set); the ASR with the flagged positions patched in every layer, no "
    "detector in the graph, alone or with their neighbours within 1 (as `atpatch fit`'s spread 1 patches them)."
)


def columns(probe, data) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001
    """Every attended column's features over all layers [n, layers * features], its input, position, culprit."""
    from atpatch.ops.reference import attended_columns, column_features

    feats, example, position, culprit = [], [], [], []
    for part, out in probe.iter_batches(data.feeds, 64):
        valid = attended_columns(out.before[0])
        valid[:, 0] = False  # [CLS] / position 0: an attention sink, never patched by the joint rule either
        rows, cols = np.nonzero(valid)
        feats.append(np.concatenate([column_features(m) for m in out.before], -1)[rows, cols])
        marked = np.zeros(valid.shape, bool)
        for r in range(valid.shape[0]):
            given = data.culprits[part.start + r]
            marked[r, [p for p in given or () if p < valid.shape[1]]] = True
        example.append(rows + part.start)
        position.append(cols)
        culprit.append(marked[rows, cols])
    return np.concatenate(feats), np.concatenate(example), np.concatenate(position), np.concatenate(culprit)


def around(x: np.ndarray, grid: bool, fill: object) -> np.ndarray:
    """Each position's neighbours in `x` [N, keys, ...], stacked first: the 8 around it on a patch grid
    (after its lead positions, as ops/joint.py reads the grid), one either side in a sequence; `fill`
    where a position has no such neighbour, and for the lead positions."""
    from atpatch.ops.joint import patch_grid

    n, keys, rest = x.shape[0], x.shape[1], x.shape[2:]
    edge = [(0, 0)] * len(rest)
    if not grid:
        pad = np.pad(x, [(0, 0), (1, 1), *edge], constant_values=fill)
        return np.stack([pad[:, :-2], pad[:, 2:]])
    lead, side = patch_grid(keys)
    g = np.pad(x[:, lead:].reshape(n, side, side, *rest), [(0, 0), (1, 1), (1, 1), *edge], constant_values=fill)
    shifted = [
        g[:, 1 + dy : 1 + dy + side, 1 + dx : 1 + dx + side] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    ]
    near = np.stack(shifted).reshape(len(shifted), n, side * side, *rest)
    return np.concatenate([np.full((len(shifted), n, lead, *rest), fill, x.dtype), near], 2)


def with_context(feats: np.ndarray, example: np.ndarray, position: np.ndarray, keys: int, grid: bool) -> np.ndarray:
    """`feats` [n, d] beside the elementwise max and mean of the same features over each column's
    `around` neighbours (on a patch grid of `keys` positions, or in a sequence), attended columns only
    ([n, 3 d]): a trigger straddling patches or tokens splits its anomaly over neighbours, which a
    detector scoring one column at a time sees in part only."""
    dense = np.full((int(example.max()) + 1, keys, feats.shape[1]), np.nan, np.float32)
    dense[example, position] = feats
    near = around(dense, grid, np.nan)[:, example, position]  # [neighbours, columns, d]
    here = np.isfinite(near)  # attended neighbours; a column without any gets zeros
    count = here.sum(0)
    peak = np.where(count > 0, np.where(here, near, -np.inf).max(0), 0)
    mean = np.where(here, near, 0).sum(0) / np.maximum(count, 1)
    return np.concatenate([feats, peak, mean], 1).astype(np.float32)


def train_mlp(x: np.ndarray, y: np.ndarray):  # noqa: ANN201
    """A 64-unit MLP on standardised features, culprits weighted a tenth of the benign mass (as fit does)."""
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.float32))
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    pos_weight = torch.tensor(max(1.0, float((~y).sum()) / max(1.0, float(y.sum())) / 10))
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(yt)).split(1024):
            logit = net(xt[idx]).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, yt[idx], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def score(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(((features - mean) / std).astype(np.float32))).squeeze(-1).numpy()

    return score


def neighbours(flags: np.ndarray, grid: bool) -> np.ndarray:
    """`flags` [N, keys] widened by 1: the 3 x 3 block on a patch grid, one either side otherwise (`around`)."""
    return flags | around(flags, grid, False).any(0)


def _line(r: dict) -> str:
    return (
        f"| {r['detector']} | {r['budget']:.1%} | {r['clean_flagged']:.2%} | {r['triggered_flagged']:.2%} | "
        f"{r['culprit_hit']:.2%} | {r['asr_flags_alone']:.2%} | {r['asr']:.2%} |"
    )


def _heading(name: str, case: dict) -> str:
    return (
        f"**{name}** (`{case['command']}`): on {case['victims']} held-out victims the ASR is "
        f"{case['asr_unpatched']:.2%} unpatched, {case['oracle']:.2%} with exactly the trigger's positions patched "
        f"in every layer, {case['oracle_spread']:.2%} with those and their neighbours (±1)."
    )


def print_and_publish(args: argparse.Namespace, case: dict) -> None:
    name = f"{args.work.parent.name}/{args.work.name}"
    print(_heading(name, case))
    results = casekit.record_case(args.out or RESULTS, name, case)
    if args.out is None:  # the published figures: every case measured so far, as one README section
        section = [f"### {TITLE}", "", EXPLAINED, ""]
        for key, measured in sorted(results.items()):
            section += [_heading(key, measured), "", HEADER, "|---|---:|---:|---:|---:|---:|---:|"]
            section += [*map(_line, measured["rows"]), ""]
        casekit.publish_section("detection_bound", "\n".join(section).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="a finished benchmark case's cache folder")
    parser.add_argument("--out", type=Path, help="write the results here and leave the published ones alone")
    args = parser.parse_args()
    import onnx

    from atpatch.detector.calibrate import allowed_flags
    from atpatch.detector.probe import AttentionProbe
    from atpatch.evaluate import oracle_logits

    folder = casekit.cached_model_folder(args.work)
    model = onnx.load(str(args.work / "model.onnx"))
    probe = AttentionProbe(model)
    names = ("debug_known", "fit_clean", "calibration", "triggered", "clean")
    sets = {name: casekit.load_cached_set(args.work, name, folder) for name in names}
    cols = {name: columns(probe, data) for name, data in sets.items()}
    triggered = sets["triggered"]
    grid = "attention_mask" not in triggered.feeds
    keys = int(cols["triggered"][2].max()) + 1
    half = np.zeros(len(triggered), bool)
    half[np.random.default_rng(SEED).permutation(len(triggered))[: len(triggered) // 2]] = True
    held_out = np.flatnonzero(~half)
    victims = triggered.subset(held_out)

    def logits_with(positions: np.ndarray) -> np.ndarray:
        """The held-out victims' logits with each one's `positions` patched in every layer (none: the original)."""
        culprits = [np.flatnonzero(row).tolist() for row in positions]
        return oracle_logits(model, replace(victims, culprits=culprits), keys)

    # The backdoor's target: where most triggered victims go unpatched.
    target = int(np.bincount(logits_with(np.zeros((len(held_out), keys), bool)).argmax(1)).argmax())

    def asr_of(positions: np.ndarray) -> float:
        return float((logits_with(positions).argmax(1) == target).mean())

    trig_ex, trig_pos, trig_y = cols["triggered"][1:]
    culprit = np.zeros((len(triggered), keys), bool)
    culprit[trig_ex[trig_y], trig_pos[trig_y]] = True
    train_half = half[trig_ex] & trig_y  # only the culprit columns of the training half: its clean columns stay out
    command = " ".join(["python benchmarks/detection_bound.py", *sys.argv[1:]])
    rows = []
    for context in (False, True):
        x = {name: with_context(*c[:3], keys, grid) if context else c[0] for name, c in cols.items()}
        both = " + neighbours" if context else ""
        detectors = {
            f"all layers{both}, debugging set": (
                np.concatenate([x["debug_known"], x["fit_clean"]]),
                np.concatenate([cols["debug_known"][3], np.zeros(len(x["fit_clean"]), bool)]),
            ),
            f"all layers{both}, half the victims": (
                np.concatenate([x["triggered"][train_half], x["fit_clean"]]),
                np.concatenate([np.ones(int(train_half.sum()), bool), np.zeros(len(x["fit_clean"]), bool)]),
            ),
        }
        for name, (train_x, train_y) in detectors.items():
            score = train_mlp(train_x, train_y)
            dense = {}
            for set_name in ("calibration", "clean", "triggered"):
                _, example, position, _ = cols[set_name]
                dense[set_name] = np.full((len(sets[set_name]), keys), -np.inf, np.float32)
                dense[set_name][example, position] = score(x[set_name])
            cal = np.sort(dense["calibration"].max(1))[::-1]
            clean, trig = dense["clean"].max(1), dense["triggered"][held_out]
            for budget in BUDGETS:
                threshold = cal[min(allowed_flags(len(cal), budget), len(cal) - 1)]
                flags = trig > threshold
                asr, asr_alone = asr_of(neighbours(flags, grid)), asr_of(flags)
                rows.append({"detector": name, "budget": budget, "clean_flagged": float((clean > threshold).mean()),
                             "triggered_flagged": float(flags.any(1).mean()),
                             "culprit_hit": float((flags & culprit[held_out]).any(1).mean()),
                             "asr_flags_alone": asr_alone, "asr": asr})  # fmt: skip
                print(_line(rows[-1]), flush=True)
    true = culprit[held_out]
    case = {
        "command": command,
        "victims": len(held_out),
        "asr_unpatched": asr_of(np.zeros_like(true)),
        "oracle": asr_of(true),
        "oracle_spread": asr_of(neighbours(true, grid)),
        "rows": rows,
    }
    print_and_publish(args, case)


if __name__ == "__main__":
    main()

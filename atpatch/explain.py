"""Why did the patch change (or not change) one prediction? Its attention maps, drawn.

For one input, one row per attention layer: the head-averaged map going into the AtPatch
node and the map coming out (of the pass whose outputs the input gets), with the key columns
patched in that layer outlined: solid red where that layer's detector flagged the column,
dashed orange where another layer or the joint rule over layers did (cross-layer patching). The predictions with and
without the patch are in the title. An image gets a first row of its own: the picture, with the
patches patched in any layer outlined the same way (solid: flagged; dashed: patched as a neighbour).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .data import Dataset
from .errors import AtPatchError

__all__ = ["ExplainReport", "check_patched", "explain", "unpatched"]

_FLAG_COLOUR = "#d62728"
_ELSEWHERE_COLOUR = "#ff7f0e"  # patched here because another layer, or the joint rule, flagged it
_MAX_TICKS = 48  # beyond this many positions, only flagged columns get a tick label


@dataclass(frozen=True)
class ExplainReport:
    index: int
    flagged: dict[int, list[int]]  # layer -> key positions its detector flagged (first pass)
    flagged_tokens: dict[int, list[str]]  # layer -> their tokens (text) or "patch k" (images)
    png: Path
    patched: dict[int, list[int]] = field(default_factory=dict)  # layer -> key positions patched there
    prediction_before: int = -1  # the model without its AtPatch nodes
    prediction_after: int = -1  # the patched model
    label: int = -1  # the label the input should get
    label_names: tuple[str, ...] = field(default=())
    joint: list[int] = field(default_factory=list)  # key positions the joint rule over layers flagged
    joint_tokens: list[str] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)  # patched by the effect check (nothing flagged, class changed)

    def summary(self) -> str:
        def name(i: int) -> str:
            return self.label_names[i] if 0 <= i < len(self.label_names) else str(i)

        lines = [
            f"input {self.index}: label {name(self.label)}; "
            f"predicted {name(self.prediction_before)} without the "
            f"patch, {name(self.prediction_after)} with it"
        ]
        for layer, tokens in self.flagged_tokens.items():
            positions = self.flagged.get(layer, [])
            shown = ", ".join(f"{t} (position {p})" for t, p in zip(tokens, positions, strict=True)) or "nothing"
            elsewhere = [p for p in self.patched.get(layer, []) if p not in positions]
            also = (
                f"; also patched, flagged in another layer, by the joint rule or the effect check: "
                f"{', '.join(map(str, elsewhere))}"
                if elsewhere
                else ""
            )
            lines.append(f"  layer {layer}: flagged {shown}{also}")
        if self.joint:
            shown = ", ".join(f"{t} (position {p})" for t, p in zip(self.joint_tokens, self.joint, strict=True))
            lines.append(f"  joint rule over all layers: flagged {shown}")
        if self.checked:
            lines.append(
                f"  effect check: nothing flagged, but patching positions {', '.join(map(str, self.checked))} in "
                "every layer changes the predicted class, so they are patched"
            )
        lines.append(f"wrote {self.png}")
        return "\n".join(lines)


def unpatched(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a patched model with its AtPatch nodes bypassed: the original computation."""
    from .rewrite.unpatch import unpatch_model

    return unpatch_model(model)


def _position_names(dataset: Dataset, index: int, length: int) -> list[str]:
    if dataset.tokens is not None:
        return list(dataset.tokens[index][:length])
    return ["[CLS]"] + [f"patch {p}" for p in range(length - 1)]


def check_patched(model: onnx.ModelProto) -> None:
    """Refuse a model without AtPatch nodes (or of another op version), saying what to pass."""
    from .detector.probe import read_detector

    try:
        read_detector(model)
    except ValueError as err:
        raise AtPatchError(
            "the model carries no AtPatch node; explain needs the patched model that atpatch-export writes"
        ) from err


def explain(
    patched: onnx.ModelProto,
    dataset: Dataset,
    index: int,
    out_png: str | Path,
    layers: Sequence[int] | None = None,
) -> ExplainReport:
    """Draw input `index` of `dataset` through the patched model to `out_png`; see the module docstring.

    `layers` picks the layers to draw (default: all); the report lists flags of every layer.
    """
    from .detector.probe import AttentionProbe
    from .modelio import atomic_output
    from .runtime import create_session

    try:
        import matplotlib  # noqa: F401 - checked first, so a missing extra fails before any work
    except ImportError as err:
        raise AtPatchError("drawing attention maps needs matplotlib: pip install matplotlib") from err
    out_png = Path(out_png)
    if not 0 <= index < len(dataset):
        raise AtPatchError(
            f"input index {index} is out of range; the set has {len(dataset)} inputs (0..{len(dataset) - 1})"
        )
    if out_png.suffix.lower() != ".png":
        raise AtPatchError(f"{out_png} does not end in .png; pass a PNG path such as explain.png")
    if not out_png.parent.resolve().is_dir():
        raise AtPatchError(f"folder {out_png.parent} does not exist; create it or choose another output path")
    check_patched(patched)

    one = dataset.subset([index])
    probe = AttentionProbe(patched)
    missing = [n for n in probe.input_names if n not in one.feeds]
    if missing:
        raise AtPatchError(
            f"the model needs inputs {', '.join(missing)} the data lacks; load the data with the model's own folder"
        )
    feeds = {n: one.feeds[n] for n in probe.input_names}
    out = probe.run(feeds)
    assert out.after is not None  # a patched model always has maps after its AtPatch nodes
    drawn = list(range(len(out.before))) if layers is None else [int(i) for i in layers]
    bad = [i for i in drawn if not 0 <= i < len(out.before)]
    if bad or not drawn:
        raise AtPatchError(f"layers {bad or drawn} are not layers of this model; choose among 0..{len(out.before) - 1}")
    before_logits = create_session(unpatched(patched)).run(None, feeds)[0]
    pred_after = int(np.asarray(out.outputs[0]).reshape(1, -1).argmax())
    pred_before = int(np.asarray(before_logits).reshape(1, -1).argmax())

    mask = one.feeds.get("attention_mask")
    length = int(mask[0].sum()) if mask is not None else out.before[0].shape[-1]
    names = _position_names(dataset, index, length)
    assert out.flagged is not None and out.patched is not None
    flagged = {layer: [int(p) for p in np.flatnonzero(f[0]) if p < length] for layer, f in enumerate(out.flagged)}
    patched_at = {layer: [int(p) for p in np.flatnonzero(f[0]) if p < length] for layer, f in enumerate(out.patched)}
    flagged_tokens = {layer: [names[p] for p in cols] for layer, cols in flagged.items()}
    joint = [] if out.joint is None else [int(p) for p in np.flatnonzero(out.joint[0]) if p < length]
    assert out.union is not None and out.second_pass is not None
    by_check = bool(out.second_pass[0]) and not joint and not any(flagged.values())
    checked = [int(p) for p in np.flatnonzero(out.union[0]) if p < length] if by_check else []

    label_names = dataset.label_names
    title_name = lambda i: label_names[i] if 0 <= i < len(label_names) else str(i)  # noqa: E731
    maps = {
        i: (
            out.before[i][0, :, :length, :length].mean(axis=0),
            out.after[i][0, :, :length, :length].mean(axis=0),
        )
        for i in drawn
    }
    title = (
        f"input {index} (label {title_name(int(one.labels[0]))}): predicted {title_name(pred_before)} "
        f"before patching, {title_name(pred_after)} after"
    )
    picture = None
    if "pixel_values" in feeds:
        found = set(joint).union(*flagged.values())
        picture = (feeds["pixel_values"][0], found, set().union(*patched_at.values()) - found)
    with atomic_output(out_png) as tmp:
        _draw(maps, flagged, patched_at, names, title, tmp, picture)
    return ExplainReport(
        index=index,
        flagged=flagged,
        flagged_tokens=flagged_tokens,
        png=out_png,
        patched=patched_at,
        prediction_before=pred_before,
        prediction_after=pred_after,
        label=int(one.labels[0]),
        label_names=label_names,
        joint=joint,
        joint_tokens=[names[p] for p in joint],
        checked=checked,
    )


def _draw(
    maps: dict[int, tuple[np.ndarray, np.ndarray]],
    flagged: dict[int, list[int]],
    patched: dict[int, list[int]],
    names: list[str],
    title: str,
    path: Path,
    picture: tuple[np.ndarray, set[int], set[int]] | None = None,
) -> None:
    """`picture`: an image [C, H, W] with the key positions flagged in it and those patched besides."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also keeps tests and servers headless
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    from matplotlib.patches import Rectangle

    length = len(names)
    cell = 0.22 if length <= _MAX_TICKS else max(0.03, 8.0 / length)
    side = min(max(3.0, cell * length), 7.0)
    rows = len(maps) + (picture is not None)
    height = rows * (side + 1.0) + 0.8
    # Deep models make tall figures: lower the resolution so the PNG stays under ~12k pixels.
    dpi = min(110.0, max(40.0, 12_000 / height))
    fig, axes = plt.subplots(rows, 2, figsize=(2 * side + 2.2, height), squeeze=False, constrained_layout=True)
    fig.suptitle(title, fontsize=11)
    if picture is not None:
        _draw_picture(axes[0, 0], *picture, length)
        axes[0, 1].axis("off")
    for row, (layer, (before, after)) in enumerate(maps.items(), start=int(picture is not None)):
        own = flagged.get(layer, [])
        cols = sorted(set(own) | set(patched.get(layer, [])))
        # One colour scale per layer, so before and after compare directly; the power norm
        # keeps small weights visible next to the [CLS]/[SEP] sinks.
        vmax = float(max(before.max(), after.max(), 1e-6))
        for col, (what, image) in enumerate((("before patching", before), ("after patching", after))):
            ax = axes[row, col]
            shown = ax.imshow(image, cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=vmax), interpolation="nearest")
            flag_text = f"{len(own)} flagged here" if own else "nothing flagged here"
            if len(cols) > len(own):
                flag_text += f", {len(cols) - len(own)} flagged elsewhere"
            ax.set_title(f"layer {layer}, {what} ({flag_text})", fontsize=9)
            for p in cols:
                here = p in own
                ax.add_patch(
                    Rectangle(
                        (p - 0.5, -0.5),
                        1,
                        length,
                        fill=False,
                        edgecolor=_FLAG_COLOUR if here else _ELSEWHERE_COLOUR,
                        linestyle="-" if here else "--",
                        linewidth=2.0 if length <= _MAX_TICKS else 0.8,
                        clip_on=False,
                    )
                )
            ticks = list(range(length)) if length <= _MAX_TICKS else cols
            ax.set_xticks(ticks)
            ax.set_xticklabels([names[t] for t in ticks], rotation=90, fontsize=7)
            for label, t in zip(ax.get_xticklabels(), ticks, strict=True):
                if t in cols:
                    label.set_color(_FLAG_COLOUR if t in own else _ELSEWHERE_COLOUR)
                    label.set_fontweight("bold")
            if length <= _MAX_TICKS:
                ax.set_yticks(range(length))
                ax.set_yticklabels(names, fontsize=7)
            else:
                ax.set_yticks([])
            ax.set_xlabel("key (attended to)", fontsize=8)
            if col == 0:
                ax.set_ylabel("query", fontsize=8)
            if col == 1:
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    fig.savefig(path, format="png", dpi=dpi)
    plt.close(fig)


def _draw_picture(ax, pixels: np.ndarray, flagged: set[int], besides: set[int], keys: int) -> None:  # noqa: ANN001
    """The input image, its patches on the grid ops/joint.py reads from `keys` positions outlined."""
    from matplotlib.patches import Rectangle

    from .ops.joint import patch_grid

    lead, side = patch_grid(keys)
    low, high = float(pixels.min()), float(pixels.max())
    image = (np.moveaxis(pixels, 0, -1) - low) / max(high - low, 1e-12)  # the model's input, stretched to [0, 1]
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0.0, vmax=1.0)
    size_y, size_x = image.shape[0] / side, image.shape[1] / side
    for positions, colour, style in ((besides, _ELSEWHERE_COLOUR, "--"), (flagged, _FLAG_COLOUR, "-")):
        for p in sorted(q for q in positions if q >= lead):
            row, col = divmod(p - lead, side)
            box = (col * size_x - 0.5, row * size_y - 0.5)
            ax.add_patch(Rectangle(box, size_x, size_y, fill=False, edgecolor=colour, linestyle=style, linewidth=2.0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("the input: patches flagged (solid) and patched besides (dashed)", fontsize=9)

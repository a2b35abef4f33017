"""onnxruntime-genai model folders: the decoder patched, everything genai reads kept beside it.

onnxruntime-genai's model builder writes a folder: `genai_config.json` (which file is the decoder,
its input and output names, the search options), the decoder with its weights in a side file, and
the tokenizer files. The patched folder is the same folder with the decoder patched, so genai's own
generate loop (og.Model, og.Generator) loads and runs it as it did the original.

Across generation steps: genai feeds only the inputs its config names, so the decoder's flag state
(`past_atpatch_flags`, rewrite/crosslayer.py) takes its default, nothing flagged before, at every
step, and `present_atpatch_flags` is computed but never read. Each step still patches what it flags
itself, in every layer: the new token's map spans every key position, the prompt's included, so a
position is patched at each step where the detector flags it again, not once for all later steps.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..detector import Detector
from ..errors import AtPatchError
from ..modelio import check_writable, external_tensors, load_model, save_model, staging_folder
from ..rewrite import AttentionSite, patch_model

__all__ = ["GENAI_CONFIG", "GenaiExport", "is_genai_folder", "patch_genai_folder"]

GENAI_CONFIG = "genai_config.json"


def is_genai_folder(path: Path) -> bool:
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


@dataclass(frozen=True)
class GenaiExport:
    output: Path
    decoder: str  # the decoder's file name, in both folders
    opset: int
    sites: list[AttentionSite]
    detector_kind: str


def _decoder(folder: Path) -> tuple[str, int | None]:
    """The decoder's file name and head count, from genai_config.json."""
    config_path = folder / GENAI_CONFIG
    try:
        decoder = json.loads(config_path.read_text())["model"]["decoder"]
        name = decoder["filename"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AtPatchError(
            f"{config_path} names no decoder (model.decoder.filename): {err}; rebuild the folder with "
            f"onnxruntime_genai.models.builder"
        ) from err
    if not (folder / name).is_file():
        raise AtPatchError(f"{config_path} names decoder {name}, which is not in {folder}; rebuild the folder")
    heads = decoder.get("num_attention_heads")
    return name, int(heads) if heads else None


def _check_output(folder: Path, output: Path) -> None:
    source, target = folder.resolve(), output.resolve()
    if target == source or source in target.parents:
        raise AtPatchError(f"output {output} is the genai folder or inside it; choose a new folder (-o)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AtPatchError(f"output {output} exists and is not an empty folder; choose a new folder (-o)")
    if not target.parent.is_dir():
        raise AtPatchError(f"output folder {output.parent} does not exist; create it or choose another -o path")
    check_writable(target.parent)


def patch_genai_folder(
    folder: Path, output: Path, detector: Detector | None = None, *, cross_layer: bool = True
) -> GenaiExport:
    """Write `output`, a copy of genai folder `folder` with its decoder patched (module docstring)."""
    _check_output(folder, output)
    name, heads = _decoder(folder)
    # Weights stay on disk: the rewrite reads the graph only, and saving streams them across.
    model = load_model(folder / name, external_data=False)
    side_files = {t.external_data[i].value for t in external_tensors(model) for i in range(len(t.external_data))
                  if t.external_data[i].key == "location"}  # fmt: skip
    patched, sites = patch_model(model, detector, heads, folder, cross_layer=cross_layer)
    final = output.resolve()
    with staging_folder(final) as staging:
        # No onnx checker here: it rejects the builder's own graphs (a Constant's declared rank), which
        # onnxruntime and genai run; the tests run the written folder in genai instead.
        save_model(patched, staging / name, base_dir=folder)
        for item in folder.iterdir():
            if item.name in {name, *side_files}:
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            else:
                shutil.copy2(item, staging / item.name)
        # Replaces an empty folder too (POSIX rename): the patched folder appears whole or not at all.
        os.replace(staging, final)
    opset = next(int(o.version) for o in patched.opset_import if o.domain in ("", "ai.onnx"))
    return GenaiExport(output, name, opset, sites, detector.kind if detector else "pass-through")

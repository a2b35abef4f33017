"""Command line: argument parsing only. `atpatch-export` is `atpatch export`, one parser for both."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import AtPatchError

__all__ = ["export_main", "main"]

_EXPORT_HELP = """\
Write a patched ONNX model: an AtPatch node after every attention softmax, with the
over-attention detector's weights inside the file. The patched model runs in plain
onnxruntime (no Python at inference); the input model is never modified.

examples:
  atpatch-export model.onnx -o model.patched.onnx --detector detector.safetensors
  atpatch-export --hf ./my-bert -o my-bert.patched.onnx        # export from PyTorch, then patch
  atpatch-export --hf ./my-bert -o my-bert.onnx --no-patch     # plain export, e.g. to fit on
  atpatch-export model.onnx --detector d.safetensors --triton repo   # Triton model repository
  atpatch-export genai-folder -o patched-folder    # onnxruntime-genai folder: its decoder patched

Without --detector the patch flags nothing (a pass-through): outputs equal the original's.
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default (flags and options without one excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # `is`, not `in`: 0 == False, and an option defaulting to 0 has a default to show.
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or "default" in text:
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", type=Path, help="ONNX model to patch, or an onnxruntime-genai folder (or use --hf)"
    )
    parser.add_argument("--hf", type=Path, metavar="DIR", help="Hugging Face model folder to export (offline)")
    parser.add_argument("-o", "--output", type=Path, help="where to write the ONNX model (give -o, --triton, or both)")
    parser.add_argument("--detector", type=Path, metavar="FILE", help="detector weights (.safetensors)")
    parser.add_argument(
        "--opset",
        type=int,
        default=17,
        help="ONNX opset for --hf exports (default 17; 17..18 tested; atpatch patches 15..26)",
    )
    parser.add_argument("--dynamo", action="store_true", help="use torch's dynamo exporter for --hf (slower)")
    parser.add_argument(
        "--with-past",
        action="store_true",
        help="with --hf, a causal LM: export one generation step with its KV cache (past_key_values in, present out)",
    )
    parser.add_argument(
        "--attention",
        choices=("eager", "sdpa"),
        default="eager",
        help="attention implementation for --hf exports (default eager; sdpa's fused ops are decomposed)",
    )
    parser.add_argument("--no-patch", dest="patch", action="store_false", help="with --hf: write the plain export")
    parser.add_argument(
        "--per-layer",
        dest="cross_layer",
        action="store_false",
        help="patch each layer's own flags only (default: a position flagged in any layer is patched in every layer, "
        "in a second pass for the inputs with a flag)",
    )
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="apply onnxruntime's transformer fusions (LayerNorm, GELU, ...) around the patch; needs onnxruntime",
    )
    parser.add_argument(
        "--fuse-attention",
        action="store_true",
        help="put each patched attention in one AtPatchAttention node (native CPU kernel: the map never leaves it; "
        "float32; outputs equal the unfused model to float rounding)",
    )
    triton = parser.add_argument_group("serving with Triton Inference Server")
    triton.add_argument("--triton", type=Path, metavar="DIR", help="write a model repository to DIR (new or empty)")
    triton.add_argument("--triton-name", metavar="NAME", help="model name in it (default: from -o or the input)")
    triton.add_argument(
        "--triton-mount",
        metavar="PATH",
        help="absolute path the server sees DIR at, e.g. in its container (default: DIR here); names the library",
    )


def _export(args: argparse.Namespace) -> str:
    from .jobs import ExportOptions, run_export

    options = ExportOptions(
        output=args.output,
        model=args.model,
        hf=args.hf,
        detector=args.detector,
        opset=args.opset,
        dynamo=args.dynamo,
        with_past=args.with_past,
        attention=args.attention,
        patch=args.patch,
        cross_layer=args.cross_layer,
        optimize=args.optimize,
        fuse_attention=args.fuse_attention,
        triton=args.triton,
        triton_name=args.triton_name,
        triton_mount=args.triton_mount,
    )
    return run_export(options).summary()


def _demo(args: argparse.Namespace) -> str:
    from .demo import run_demo

    return run_demo(args.dir).summary()


def _localize(args: argparse.Namespace) -> str:
    from .workflow import run_localize

    return run_localize(args.model, args.hf, args.data, args.output, args.budget)


def _fit(args: argparse.Namespace) -> str:
    from .detector.tradeoff import FairnessOptions
    from .fit_workflow import run_fit

    fairness = None
    if args.protected:
        fairness = FairnessOptions(args.validation, args.counterfactual, args.group_field, args.max_accuracy_drop)
    else:
        given = [
            f"--{n.replace('_', '-')}" for n in ("validation", "counterfactual", "group_field") if getattr(args, n)
        ]
        if given:
            verb = "is" if len(given) == 1 else "are"
            raise AtPatchError(f"{', '.join(given)} {verb} for the fairness fit; add --protected")
    tokens = None if args.protected_tokens is None else [t.strip() for t in args.protected_tokens.split(",")]
    return run_fit(
        args.model,
        args.hf,
        args.clean,
        args.output,
        args.misbehaving,
        args.calibration,
        args.target_flag_rate,
        args.budget,
        args.culprits,
        fairness,
        tokens,
        joint=not args.no_joint,
    )


def _eval(args: argparse.Namespace) -> str:
    from .workflow import run_eval

    return run_eval(
        args.original,
        args.patched,
        args.hf,
        args.clean,
        args.triggered,
        args.target,
        args.counterfactual,
        args.group_field,
        args.json,
        args.masked,
    )


def _explain(args: argparse.Namespace) -> str:
    from .workflow import run_explain

    return run_explain(args.patched, args.hf, args.data, args.index, args.output)


def _add_workflow_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    hf_help = "the model's Hugging Face folder (tokenizer, label names)"
    data_help = "text as .jsonl (text, label, optional expected/culprit) or images as .npz"

    localize = commands.add_parser(
        "localize", help="find the input positions that make inputs misbehave", formatter_class=_Help
    )
    localize.add_argument("model", type=Path, help="the (unpatched) ONNX model")
    localize.add_argument("--hf", type=Path, required=True, metavar="DIR", help=hf_help)
    localize.add_argument("--data", type=Path, required=True, help=f"misbehaving inputs: {data_help}")
    localize.add_argument(
        "-o", "--output", type=Path, required=True, help="culprits, one JSON line per input (fit --culprits reads it)"
    )
    localize.add_argument("--budget", type=int, default=64, help="model calls per input")
    localize.set_defaults(job=_localize)

    fit = commands.add_parser("fit", help="fit the over-attention detector from a debugging set", formatter_class=_Help)
    fit.add_argument("model", type=Path, help="the (unpatched) ONNX model")
    fit.add_argument("--hf", type=Path, required=True, metavar="DIR", help=hf_help)
    fit.add_argument("--clean", type=Path, required=True, help=f"clean inputs: {data_help}")
    fit.add_argument("--misbehaving", type=Path, help="inputs the model gets wrong; culprits localized if not given")
    fit.add_argument(
        "--culprits",
        type=Path,
        help="atpatch localize's output for --misbehaving: its culprits are used, not localized again",
    )
    fit.add_argument("--calibration", type=Path, help="held-out clean inputs (default: half of --clean)")
    fit.add_argument(
        "--target-flag-rate", type=float, default=0.005, help="share of unseen clean inputs allowed any flag"
    )
    fit.add_argument("--budget", type=int, default=64, help="model calls per input for localization")
    fit.add_argument(
        "--no-joint",
        action="store_true",
        help="per-layer thresholds only: never the joint rule over layers (default: used where it fixes more; "
        "never with --protected)",
    )
    fit.add_argument("-o", "--output", type=Path, required=True, help="detector file (.safetensors)")
    fair = fit.add_argument_group(
        "fairness (--protected)",
        "thresholds chosen by counterfactual flips against accuracy, not by --target-flag-rate;\n"
        "the trade-off goes to <output stem>.tradeoff.png and .tradeoff.json beside the detector",
    )
    fair.add_argument(
        "--protected", action="store_true", help="fairness mode: the misbehaviour is reliance on a protected attribute"
    )
    fair.add_argument(
        "--validation",
        type=Path,
        metavar="FILE",
        help="labelled validation rows, JSONL (default: none; required with --protected)",
    )
    fair.add_argument(
        "--counterfactual",
        type=Path,
        metavar="FILE",
        help="--validation with the attribute flipped, row by row (default: none; required with --protected)",
    )
    fair.add_argument(
        "--group-field", metavar="NAME", help="0/1 field of --validation for the parity gap (default: no gap)"
    )
    fair.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.3,
        metavar="POINTS",
        help="validation accuracy the patch may cost, in percentage points",
    )
    fair.add_argument(
        "--protected-tokens",
        metavar="T1,T2,...",
        help="the attribute's tokens: they are the culprits of each --misbehaving input "
        "(default: culprits from --culprits, JSONL spans, or localization)",
    )
    fit.set_defaults(job=_fit)

    ev = commands.add_parser(
        "eval", help="original vs patched: ASR, clean accuracy, flag rates, fairness", formatter_class=_Help
    )
    ev.add_argument("original", type=Path)
    ev.add_argument("patched", type=Path)
    ev.add_argument("--hf", type=Path, required=True, metavar="DIR", help=hf_help)
    ev.add_argument("--clean", type=Path, required=True, help=f"clean inputs: {data_help}")
    ev.add_argument("--triggered", type=Path, help="triggered inputs (with their true labels)")
    ev.add_argument("--target", help="the label the backdoor forces (id or name)")
    ev.add_argument("--counterfactual", type=Path, help="--clean with the protected attribute flipped, row by row")
    ev.add_argument("--group-field", help="JSONL field of --clean holding the 0/1 protected group")
    ev.add_argument(
        "--masked",
        type=Path,
        metavar="FILE",
        help="--clean with the protected attribute masked or removed, row by row; the original's gaps on it are "
        "the floor, and each model's distance above it is reported (needs --group-field; default: none, no floor)",
    )
    ev.add_argument("--json", type=Path, help="also write the report as JSON")
    ev.set_defaults(job=_eval)

    ex = commands.add_parser(
        "explain", help="PNG of one input's attention maps before/after patching", formatter_class=_Help
    )
    ex.add_argument("patched", type=Path)
    ex.add_argument("--hf", type=Path, required=True, metavar="DIR", help=hf_help)
    ex.add_argument("--data", type=Path, required=True, help=data_help)
    ex.add_argument("--index", type=int, default=0, help="which input")
    ex.add_argument("-o", "--output", type=Path, required=True, help="PNG file")
    ex.set_defaults(job=_explain)


def _doctor(args: argparse.Namespace) -> str:
    from .runtime.doctor import report

    return report()


class _Terminated(BaseException):
    """SIGTERM, raised where the job is so that its atomic writers remove their temporary files."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _run(prog: str, job: Callable[[argparse.Namespace], str], args: argparse.Namespace) -> int:
    # Python's default for SIGTERM ends the process on the spot, leaving a half-written temp file.
    # Only the main thread may set handlers: main() called from another thread keeps the default.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        print(job(args))
    except AtPatchError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{prog}: terminated; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader (e.g. `| head`) closed early: the job's files are written; say nothing more,
        # and keep Python's exit-time flush from raising the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atpatch-export", description=_EXPORT_HELP, formatter_class=_Help)
    _add_export_arguments(parser)
    return _run("atpatch-export", _export, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atpatch", description="Hot-fix over-attention in transformer models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export",
        help="write a patched ONNX model (same as atpatch-export)",
        description=_EXPORT_HELP,
        formatter_class=_Help,
    )
    _add_export_arguments(export)
    export.set_defaults(job=_export)
    demo = commands.add_parser(
        "demo",
        help="hot-fix a backdoored ViT on real digits: localize, fit, export, eval, explain (about a minute)",
        formatter_class=_Help,
    )
    demo.add_argument("--dir", type=Path, default=Path("atpatch-demo"), help="folder for the demo's files")
    demo.set_defaults(job=_demo)
    doctor = commands.add_parser("doctor", help="versions, providers, and whether the native kernel loads")
    doctor.set_defaults(job=_doctor)
    _add_workflow_commands(commands)
    args = parser.parse_args(argv)
    return _run(f"atpatch {args.command}", args.job, args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: argument parsing only. `atpatch-export` is `atpatch export`, one parser for both."""

from __future__ import annotations

import argparse
import sys
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

Without --detector the patch flags nothing (a pass-through): outputs equal the original's.
"""


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", type=Path, help="ONNX model to patch (or use --hf)")
    parser.add_argument("--hf", type=Path, metavar="DIR", help="Hugging Face model folder to export (offline)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the ONNX model")
    parser.add_argument("--detector", type=Path, metavar="FILE", help="detector weights (.safetensors)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset for --hf exports (default 17; 17..18 tested)")
    parser.add_argument("--dynamo", action="store_true", help="use torch's dynamo exporter for --hf (slower)")
    parser.add_argument("--no-patch", dest="patch", action="store_false", help="with --hf: write the plain export")


def _export(args: argparse.Namespace) -> str:
    from .jobs import ExportOptions, run_export

    options = ExportOptions(
        output=args.output,
        model=args.model,
        hf=args.hf,
        detector=args.detector,
        opset=args.opset,
        dynamo=args.dynamo,
        patch=args.patch,
    )
    return run_export(options).summary()


def _demo(args: argparse.Namespace) -> str:
    from .jobs import run_demo

    return run_demo(args.dir)


def _doctor(args: argparse.Namespace) -> str:
    from .runtime.doctor import report

    return report()


def _run(prog: str, job: Callable[[argparse.Namespace], str], args: argparse.Namespace) -> int:
    try:
        print(job(args))
    except AtPatchError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="atpatch-export", description=_EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_export_arguments(parser)
    return _run("atpatch-export", _export, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atpatch", description="Hot-fix over-attention in transformer models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export",
        help="write a patched ONNX model (same as atpatch-export)",
        description=_EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_export_arguments(export)
    export.set_defaults(job=_export)
    demo = commands.add_parser("demo", help="export and patch a tiny random BERT, and run both")
    demo.add_argument("--dir", type=Path, default=Path("atpatch-demo"), help="folder for the demo's files")
    demo.set_defaults(job=_demo)
    doctor = commands.add_parser("doctor", help="versions, providers, and whether the native kernel loads")
    doctor.set_defaults(job=_doctor)
    args = parser.parse_args(argv)
    return _run(f"atpatch {args.command}", args.job, args)


if __name__ == "__main__":
    sys.exit(main())

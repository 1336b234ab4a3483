"""The ``fxforge`` command line: the parser, ``main(argv)`` and the console script ``run``.

This module imports no torch: ``fxforge --help``, ``--version`` and the usage errors argparse catches answer at
once. Once the command line parses, ``main`` imports ``fxforge.commands`` (the compiler, its plugins, torch) and
runs the command there. ``main`` returns the exit status (0 ok, 2 usage error, 1 compile error) so tests can call
it in process; errors print their message without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .version import __version__

_EPILOG = """\
MODEL is either
  torchvision:NAME          a torchvision model with random weights (nothing is downloaded); its BatchNorm
                            statistics are re-estimated on 2 random batches so the numbers mean something
  path/to/file.py:FACTORY   FACTORY() returns an nn.Module, or (module, example_inputs)
  path/to/model.fxf         (export only) a model saved by fxforge.save or fxforge compile --save

examples:
  fxforge targets
  fxforge pipeline x86
  fxforge compile torchvision:resnet18 --target cpu --report out/
  fxforge compile torchvision:resnet18 --target x86 --calibration random:8 --input-shape 1,3,64,64
  fxforge show torchvision:resnet18 --after fold-bn -o fold-bn.svg
  fxforge show torchvision:resnet18 --after fold-bn --diff -o fold-bn-diff.svg
  fxforge bench torchvision:resnet18 --target cpu x86
  fxforge export torchvision:resnet18 resnet18.pt2 --input-shape 2,3,224,224
  fxforge info resnet18.pt2

Exit status: 0 ok, 2 bad command line (checked before any work), 1 the compile failed (the message says what to do).
"""
_QUANT_MODES = ("static", "dynamic", "weight-only")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape: write it as 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"'{text}': dimensions must be positive integers, e.g. 1,3,224,224")
    return shape


# ---- the parser -------------------------------------------------------------------------------------------

def _model_arguments(p: argparse.ArgumentParser, target_help: str, default_target: str | None = "cpu") -> None:
    p.add_argument("model", metavar="MODEL", help="torchvision:NAME or path/to/file.py:FACTORY (see fxforge --help)")
    if default_target is not None:
        p.add_argument("--target", "-t", default=default_target, help=target_help)
    p.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224), metavar="N,C,H,W",
                   help="shape of the random example input (default 1,3,224,224; ignored when FACTORY returns inputs)")
    p.add_argument("--calibration", metavar="random:N",
                   help="int8 targets: calibrate on N random batches (try-out only; use real data from Python)")
    p.add_argument("--quantization", choices=_QUANT_MODES,
                   help="int8 targets: quantization mode (default static)")


def _json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (notes go to stderr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxforge", description="fxforge: compile PyTorch models with torch.fx, and see what the compiler did.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what the compiler does on stderr: -v one line per pass, -vv details")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr (no warnings, no bars)")
    parser.add_argument("--version", action="version", version=f"fxforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("targets", help="list the targets and whether this machine can run them",
                       description="List every target: usable here or not (and why), and what it does.")
    _json_argument(p)
    p = sub.add_parser("pipeline", help="print a target's pipeline text", formatter_class=raw,
                       description="Print the pass pipeline of TARGET; the text works as compile(pipeline=...).",
                       epilog="examples:\n  fxforge pipeline cpu\n  fxforge pipeline x86 --explain\n"
                              "  fxforge pipeline x86 --quantization dynamic")
    p.add_argument("target", metavar="TARGET", help="a target name (fxforge targets lists them)")
    p.add_argument("--quantization", choices=_QUANT_MODES, help="int8 targets: mode")
    p.add_argument("--explain", action="store_true", help="also list each pass with a line on what it does")
    _json_argument(p)

    p = sub.add_parser("compile", help="compile MODEL and print the report (--report DIR: also HTML)",
                       formatter_class=raw, description="Compile MODEL for a target and print the compile report.",
                       epilog="examples:\n  fxforge compile torchvision:resnet18 --target cpu --report out/\n"
                              "  fxforge compile torchvision:resnet18 --target x86 --calibration random:8 --save m.fx\n"
                              "  fxforge compile torchvision:mobilenet_v2 --target x86 --calibration random:8\n"
                              "  fxforge compile mymodel.py:make --target cpu --pipeline remove-noops,fold-bn")
    _model_arguments(p, "target to compile for (default cpu; fxforge targets lists them)")
    p.add_argument("--pipeline", help="run this pipeline text instead of the target's (fxforge pipeline TARGET)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="write report.txt, report.json and report.html (graphs after each pass) into DIR")
    p.add_argument("--save", type=Path, metavar="PATH",
                   help="save the compiled model (fxforge.save: a self-describing file, fxforge.load reads it)")
    _json_argument(p)

    p = sub.add_parser("show", help="draw MODEL's graph after a pass (.svg/.png/.pdf/.dot)", formatter_class=raw,
                       description="Compile MODEL and draw its graph after a pass (default: the last one).",
                       epilog="examples:\n  fxforge show torchvision:resnet18 -o resnet18.svg\n"
                              "  fxforge show torchvision:resnet18 --after trace -o traced.png\n"
                              "  fxforge show torchvision:resnet18 --after fold-bn --diff -o fold-bn.svg\n"
                              "  fxforge show torchvision:resnet18 --target x86 --calibration random:4 "
                              "--after insert-qdq -o qdq.svg")
    _model_arguments(p, "target whose pipeline runs (default cpu)")
    p.add_argument("--pipeline", help="run this pipeline text instead of the target's")
    p.add_argument("--after", metavar="PASS", help="the pass (name or spec) after which to draw; 'trace': the traced "
                                                   "graph; default: the final graph")
    p.add_argument("--diff", action="store_true", help="highlight what that pass added, removed and rewrote")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="output file; its suffix picks the format: .svg, .png, .pdf or .dot")
    p.add_argument("--collapse", action=argparse.BooleanOptionalAction, default=None,
                   help="draw runs of identical blocks once (default: when the graph has over 150 nodes)")
    p.add_argument("--constants", action="store_true", help="also draw constants (weights, qparams)")

    p = sub.add_parser("bench", help="time MODEL eager and compiled for one or more targets", formatter_class=raw,
                       description="Quick in-process latency check: eager, then each target (median of --repeats).",
                       epilog="examples:\n  fxforge bench torchvision:resnet18 --target cpu\n"
                              "  fxforge bench torchvision:mobilenet_v2 --target cpu x86 --input-shape 1,3,160,160\n"
                              "For peers side by side (onnxruntime, torch.compile, ...) use benchmarks/bench_cpu.py.")
    _model_arguments(p, "", default_target=None)
    p.add_argument("--target", "-t", nargs="+", default=["cpu"], metavar="T", help="targets to time (default cpu)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per model (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    _json_argument(p)

    p = sub.add_parser("export", help="compile MODEL (or load a .fxf) and write it to run without fxforge",
                       formatter_class=raw,
                       description="Write a compiled model as a torch.export program (.pt2), an AOTInductor package "
                                   "(.aoti.pt2) or ONNX (.onnx); the suffix of OUT picks the format.",
                       epilog="examples:\n  fxforge export torchvision:resnet18 r18.pt2 --input-shape 2,3,224,224\n"
                              "  fxforge export torchvision:resnet18 r18.aoti.pt2\n  fxforge export r18.fxf r18.pt2\n"
                              "A dynamic batch needs an example batch of 2 or more (--input-shape).")
    _model_arguments(p, "target to compile for (default cpu; ignored for a .fxf)")
    p.add_argument("output", type=Path, metavar="OUT", help="the file to write: .pt2, .aoti.pt2 or .onnx")
    p.add_argument("--format", choices=("pt2", "aoti", "onnx"), help="the format, when OUT's suffix does not say it")
    p.add_argument("--static", action="store_true", help="fix every dimension at the example's size")

    p = sub.add_parser("info", help="print what a saved or exported model file holds", formatter_class=raw,
                       description="Print what PATH holds: a .fxf (fxforge.save), a torch.export program (.pt2), "
                                   "an AOTInductor package or an ONNX model. Nothing in the file is run.",
                       epilog="examples:\n  fxforge info model.fxf\n  fxforge info model.pt2 --json")
    p.add_argument("path", type=Path, metavar="PATH", help="the file to describe")
    _json_argument(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code or 0)
    from .commands import execute  # imported here, not at the top: it loads torch, which --help must not wait for

    return execute(parser, args)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()

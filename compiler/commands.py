"""What the ``fxforge`` commands do: load the model, check the command line, compile, print, draw, time.

``fxforge.cli`` parses the command line without importing torch, then hands the arguments to ``execute`` here
(this module imports the compiler, its plugins and torch). ``execute`` returns the exit status: 2 for a command
line that cannot work (checked before any model is loaded), 1 when compiling fails (the typed error's message,
the traceback only with ``--debug``), 0 on success.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxforge.api  # noqa: F401  (the public API: importing it registers the built-in passes, targets, viz)

from . import progress, viz
from .artifact import describe, load, save
from .capture.signature import call_with
from .compile import compile as compile_model
from .errors import ArtifactError, CalibrationError, CompileError, ConfigError, suggest
from .numerics.metrics import max_errors
from .pipeline.manager import PassManager
from .pipeline.pass_api import pass_class
from .pipeline.targets import all_targets, pipeline_for, resolve_target
from .pipeline.text import parse_pipeline
from .quant.sqnr import outputs_sqnr_db
from .serialization.deploy import format_for
from .serialization.describe import deployed_kind, describe_deployed
from .testing.helpers import reestimate_bn
from .viz import GraphvizNotFoundWarning
from .viz.render import DOT_SUFFIXES, FORMATS

_LOG_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}  # -q, default, -v (-vv: DEBUG)


class UsageError(Exception):
    """A command line that cannot work (bad MODEL, bad --calibration): exit status 2."""


# ---- models and inputs ------------------------------------------------------------------------------------

def _torchvision_model(name: str, shape: tuple[int, ...]) -> nn.Module:
    try:
        import torchvision  # optional dependency: only for torchvision:NAME models
    except ImportError:
        raise UsageError("torchvision is not installed: pip install torchvision, or give path/to/file.py:factory") \
            from None
    names = torchvision.models.list_models()
    if name not in names:
        raise UsageError(f"torchvision has no model '{name}'.{suggest(name, names)} e.g. resnet18, mobilenet_v2, "
                         f"efficientnet_b0")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    batch = (max(shape[0], 2), *shape[1:])  # train-mode BatchNorm needs more than one value per channel
    try:
        return reestimate_bn(model, [torch.randn(batch) for _ in range(2)])
    except (RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"--input-shape {','.join(map(str, shape))}: torchvision:{name} fails on an input of that "
                         f"shape ({type(exc).__name__}: {first}). Give the shape the model takes, e.g. 1,3,224,224 "
                         f"(N,C,H,W)") from exc


def _file_model(path: str, factory: str) -> tuple[nn.Module, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"MODEL file '{path}' does not exist (MODEL is path/to/file.py:factory)")
    spec = importlib.util.spec_from_file_location(f"fxforge_cli_model_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise CompileError(f"importing {path} failed with {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise UsageError(f"{path} has no function '{factory}'.{suggest(factory, found)} MODEL is path/to/file.py:"
                         f"FACTORY, where FACTORY() returns an nn.Module or (module, example_inputs)")
    try:
        made = fn()
    except Exception as exc:
        raise CompileError(f"{path}:{factory}() failed with {type(exc).__name__}: {exc}") from exc
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{path}:{factory}() returned {type(model).__name__}; it must return an nn.Module or "
                         f"(module, example_inputs)")
    return model, inputs


def load_model(spec: str, shape: tuple[int, ...]) -> tuple[nn.Module, Any]:
    """``torchvision:NAME`` or ``path/to/file.py:FACTORY`` -> (model in eval mode, example inputs)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UsageError(f"MODEL '{spec}' should be torchvision:NAME (e.g. torchvision:resnet18) or "
                         f"path/to/file.py:FACTORY")
    if source == "torchvision":
        model, inputs = _torchvision_model(name, shape), None
    else:
        model, inputs = _file_model(source, name)
    return model.eval(), torch.randn(shape) if inputs is None else inputs


def calibration_data(text: str | None, example: Any) -> list | None:
    """``random:N``: N random batches shaped like the example inputs (fine to try a target, not for accuracy)."""
    if text is None:
        return None
    _check_calibration(text)
    inputs = example if isinstance(example, tuple) else (example,)

    def like(x: Any) -> Any:
        return torch.randn_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    count = int(text.partition(":")[2])
    return [tuple(like(x) for x in inputs) if len(inputs) > 1 else like(inputs[0]) for _ in range(count)]


def _compile(args: argparse.Namespace, target: str, model: nn.Module, example: Any, calibration: list | None):
    try:
        return compile_model(model, target, example_inputs=example, pipeline=getattr(args, "pipeline", None),
                               calibration=calibration, quantization=getattr(args, "quantization", None))
    except CalibrationError as exc:
        if calibration is None:
            raise CalibrationError(f"{exc}. From the command line: --calibration random:8 (random data: to try the "
                                   f"target, not to measure accuracy), or --quantization dynamic") from exc
        raise


# ---- checks made before any work: a bad command line exits 2 without loading or compiling anything --------

def _check_target(name: str, option: str) -> None:
    names = list(all_targets())
    if name != "auto" and name not in names:
        raise UsageError(f"{option} '{name}' is not a target.{suggest(name, names)} Targets: auto, {', '.join(names)} "
                         f"(fxforge targets says which run here)")


def _pipeline_text(args: argparse.Namespace) -> str | None:
    """The pipeline the command will run (None: decided by target auto at compile time)."""
    if getattr(args, "pipeline", None) is not None:
        return args.pipeline
    target = args.target if isinstance(args.target, str) else None
    if target in (None, "auto"):
        return None
    try:
        return pipeline_for(target, args.quantization)
    except ConfigError as exc:  # e.g. --quantization on an fp32 target
        raise UsageError(f"--quantization {args.quantization}: {exc}") from None


def _check_pipeline(args: argparse.Namespace) -> None:
    text = getattr(args, "pipeline", None)
    if text is None:
        return
    try:
        PassManager.from_text(text)
    except CompileError as exc:
        raise UsageError(f"--pipeline: {exc}") from None


def _check_after(args: argparse.Namespace) -> None:
    text = _pipeline_text(args)
    if args.after is None or args.after == "trace" or text is None:
        return
    try:
        passes = [p.spec() for p in PassManager.from_text(text).passes]
    except CompileError as exc:
        raise UsageError(f"{exc}") from None
    names = [*dict.fromkeys([s.name for s in passes] + [str(s) for s in passes])]
    if args.after not in names:
        raise UsageError(f"--after {args.after}: no pass of that name in the pipeline.{suggest(args.after, names)} "
                         f"Passes: {', '.join(str(s) for s in passes)} (or 'trace' for the traced graph)")


def _check_calibration(text: str | None) -> None:
    kind, _, count = (text or "random:1").partition(":")
    if kind != "random" or not count.isdigit() or int(count) < 1:
        raise UsageError(f"--calibration '{text}': use random:N, e.g. random:8 (N random batches shaped like the "
                         f"example input); for real data call fxforge.compile(..., calibration=loader) from Python")


def _check_export(args: argparse.Namespace) -> None:
    try:
        format_for(args.output, args.format)
    except ConfigError as exc:
        raise UsageError(f"OUT {args.output}: {exc}") from None
    if _is_saved_model(args.model) and not Path(args.model).is_file():
        raise UsageError(f"MODEL file '{args.model}' does not exist")


def check_arguments(args: argparse.Namespace) -> None:
    """Raise UsageError for a command line that cannot work, before any model is loaded."""
    if args.command == "pipeline":
        _check_target(args.target, "TARGET")
        _pipeline_text(args)
        return
    if args.command in ("targets", "info"):
        return
    if args.command == "export":
        _check_export(args)
    for target in [args.target] if isinstance(args.target, str) else args.target:
        _check_target(target, "--target")
    _check_calibration(args.calibration)
    _check_pipeline(args)
    _pipeline_text(args)
    if args.command == "show":
        if args.output.suffix.lower() not in (*FORMATS, *DOT_SUFFIXES):
            raise UsageError(f"-o {args.output}: name the file .svg, .png, .pdf or .dot (the suffix picks the format)")
        _check_after(args)
    if args.command == "bench" and (args.repeats < 1 or args.warmup < 0 or args.threads < 0):
        raise UsageError("bench: --repeats must be at least 1, --warmup and --threads at least 0")


# ---- output -----------------------------------------------------------------------------------------------

def table(rows: Sequence[Sequence[str]], gap: int = 2) -> list[str]:
    """Rows as lines with every column but the last padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    padded = ([c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)] + [r[-1]] for r in rows)
    return [(" " * gap).join(cells).rstrip() for cells in padded]


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _note(args: argparse.Namespace, text: str) -> None:
    """A message for the user: stdout, or stderr when stdout carries JSON."""
    print(text, file=sys.stderr if args.json else sys.stdout)


# ---- commands ---------------------------------------------------------------------------------------------

def cmd_targets(args: argparse.Namespace) -> int:
    found = [(t, t.availability()) for t in all_targets().values()]
    if args.json:
        _print_json([{"name": t.name, "usable": reason is None, "reason": reason, "device": t.device,
                      "int8": t.quant_backend is not None, "description": t.description} for t, reason in found])
        return 0
    rows = [["target", "status", "description"]]
    for t, reason in found:
        rows.append([t.name, "usable" if reason is None else "unusable", t.description])
    lines = table(rows)
    indent = len(lines[0]) - len("description")
    print(lines[0])
    for line, (_, reason) in zip(lines[1:], found, strict=True):
        print(line)
        if reason:
            print(f"{'':<{indent}}({reason})")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    text = pipeline_for(args.target, args.quantization)
    specs = parse_pipeline(text)
    docs = [(pass_class(spec.name).__doc__ or "").strip().splitlines() for spec in specs]
    firsts = [doc[0].replace("``", "") if doc else "" for doc in docs]
    if args.json:
        _print_json({"target": args.target, "quantization": args.quantization, "pipeline": text,
                     "passes": [{"name": spec.name, "spec": str(spec), "summary": first}
                                for spec, first in zip(specs, firsts, strict=True)]})
        return 0
    print(text)
    if args.explain:
        for line in table([[str(spec), first] for spec, first in zip(specs, firsts, strict=True)]):
            print(f"  {line}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    model, example = load_model(args.model, args.input_shape)
    compiled = _compile(args, args.target, model, example, calibration_data(args.calibration, example))
    files: dict[str, str] = {}
    if args.report is not None:
        out = compiled.report.save(args.report)
        html = compiled.report.to_html(out / "report.html")
        files["report"] = str(out)
    if args.save is not None:
        path = save(compiled, args.save, example_inputs=example)
        files["saved"] = str(path)
    if args.json:
        _print_json({**compiled.report.to_dict(), "files": files})
    else:
        print(compiled.report)
    if args.report is not None:
        _note(args, f"\nreport written to {out}/: report.txt, report.json and {html.name} (open it in a browser)")
    if args.save is not None:
        _note(args, f"\ncompiled model saved to {path}: load it with fxforge.load({str(path)!r}) "
                    f"(no tracing, no model class needed)")
    return 0


def _draw(fn: Callable[..., Path], *args: Any, **kwargs: Any) -> Path:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphvizNotFoundWarning)
        path = fn(*args, **kwargs)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return path


def cmd_show(args: argparse.Namespace) -> int:
    model, example = load_model(args.model, args.input_shape)
    compiled = _compile(args, args.target, model, example, calibration_data(args.calibration, example))
    report = compiled.report
    if args.after is None:  # the final graph, and the one before the last change
        stage, before = report.stages[-1], report.stages[max(len(report.stages) - 2, 0)]
    else:
        stage, before = report.stage(args.after), report.stage_before(args.after)
    options = {"collapse": args.collapse, "constants": args.constants}
    if args.diff:
        path = _draw(viz.diff, before, stage, args.output, **options)
    else:
        path = _draw(viz.render, stage, args.output, **options)
    print(f"wrote {path} (the graph after {stage.after}{', diff against ' + before.after if args.diff else ''})")
    return 0


@torch.inference_mode()
def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int, label: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in progress.bar(range(repeats), desc=f"timing {label}", unit="run"):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _accuracy(compiled: nn.Module, model: nn.Module, inputs: Any) -> tuple[str, float]:
    """("output_sqnr_db", dB) for int8 models, else ("max_rel_error", error): against eager on ``inputs``."""
    with torch.inference_mode():
        got, want = call_with(compiled, inputs), call_with(model, inputs)
    if compiled.report.quantization is not None:
        return "output_sqnr_db", outputs_sqnr_db(want, got)
    return "max_rel_error", max_errors(got, want)[1]


def _bench_line(row: dict[str, Any], width: int) -> str:
    line = f"{row['target']:<{width}}{row['ms']:>10.2f} ms"
    if "speedup" in row:
        line += f"  {row['speedup']:5.2f}x eager  "
        line += (f"SQNR {row['output_sqnr_db']:.1f} dB" if "output_sqnr_db" in row
                 else f"max rel err {row['max_rel_error']:.2g}")
    return line


def cmd_bench(args: argparse.Namespace) -> int:
    model, example = load_model(args.model, args.input_shape)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = {"model": args.model, "input_shape": list(args.input_shape), "repeats": args.repeats,
            "warmup": args.warmup, "threads": torch.get_num_threads(), "torch_version": torch.__version__}
    width = max(len(t) for t in ["eager", *args.target]) + 2
    if not args.json:
        print(f"{args.model}, input {'x'.join(map(str, args.input_shape))}, median of {args.repeats} runs after "
              f"{args.warmup} warm-up, {head['threads']} threads, torch {torch.__version__}")
    eager = _median_ms(lambda: call_with(model, example), args.repeats, args.warmup, "eager")
    rows = [{"target": "eager", "ms": eager}]
    if not args.json:
        print(_bench_line(rows[0], width))
    for target in args.target:
        calibration = args.calibration
        if calibration is None and resolve_target(target).quant_backend is not None:
            calibration = "random:8"
            _note(args, f"note: {target} is int8: calibrating on random:8 (give --calibration to change it)")
        compiled = _compile(args, target, model, example, calibration_data(calibration, example))
        ms = _median_ms(lambda c=compiled: call_with(c, example), args.repeats, args.warmup, target)
        kind, value = _accuracy(compiled, model, example)
        rows.append({"target": compiled.target, "ms": ms, "speedup": eager / ms, kind: value})
        if not args.json:
            print(_bench_line(rows[-1], width))
    if args.json:
        _print_json({**head, "results": rows})
    return 0


def _is_saved_model(spec: str) -> bool:
    """MODEL names a file from fxforge.save (not torchvision:NAME or file.py:FACTORY)."""
    return spec.lower().endswith(".fxf")


def cmd_export(args: argparse.Namespace) -> int:
    if _is_saved_model(args.model):
        compiled, example = load(args.model), None  # the compiled shapes: random inputs of them
    else:
        model, example = load_model(args.model, args.input_shape)
        compiled = _compile(args, args.target, model, example, calibration_data(args.calibration, example))
    path = compiled.export(args.output, args.format, example_inputs=example, dynamic=not args.static)
    print(f"wrote {path} ({format_for(path, args.format).description}); fxforge info {path} shows what it holds")
    return 0


def _described(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    kind = deployed_kind(path)
    if kind is not None:
        return describe_deployed(path, kind)
    try:
        return describe(path)
    except ArtifactError:
        raise ArtifactError(f"{path} is none of the files fxforge info reads: a .fxf from fxforge.save, a "
                            f"torch.export program or AOTInductor package (.pt2), an ONNX model (.onnx)") from None


def _info_lines(info: dict[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict) and value:
            lines += [f"{indent}{key}:", *_info_lines(value, indent + "  ")]
        elif isinstance(value, list) and value:
            lines += [f"{indent}{key}:", *(f"{indent}  {v if not isinstance(v, dict) else _flat(v)}" for v in value)]
        else:
            lines.append(f"{indent}{key}: {value if value not in ({}, []) else '-'}")
    return lines


def _flat(item: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in item.items())


def cmd_info(args: argparse.Namespace) -> int:
    info = _described(args.path)
    if args.json:
        _print_json({"path": str(args.path), **info})
        return 0
    print("\n".join([f"{args.path}", *_info_lines(info, "  ")]))
    return 0


_COMMANDS = {"targets": cmd_targets, "pipeline": cmd_pipeline, "compile": cmd_compile, "show": cmd_show,
             "bench": cmd_bench, "export": cmd_export, "info": cmd_info}


def execute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command: its exit status (``parser`` prints the usage line on a usage error)."""
    with _logging(-1 if args.quiet else args.verbose), progress.enabled(False if args.quiet else None):
        return _run(parser, args)


@contextlib.contextmanager
def _logging(verbosity: int) -> Iterator[None]:
    """Records of the fxforge logger on stderr while a command runs: -q errors, default warnings, -v INFO (one
    line per pass), -vv DEBUG."""
    logger = logging.getLogger("fxforge")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level, logger_level = _LOG_LEVELS.get(verbosity, logging.DEBUG), logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logger_level)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        check_arguments(args)
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        if args.debug:
            raise
        parser.print_usage(sys.stderr)
        print(f"fxforge: error: {exc}", file=sys.stderr)
        return 2
    except CompileError as exc:
        if args.debug:
            raise
        print(f"fxforge: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(f"fxforge: unexpected {type(exc).__name__}: {exc}\nRerun with --debug for the traceback, and report it "
              f"with the command line if it looks like a bug.", file=sys.stderr)
        return 1

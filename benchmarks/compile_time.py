"""Compile time of resnet50 (or ``--models``), excluding calibration forward passes.

For each target, ``--repeats`` compiles of the same model (a fresh deep copy is made inside compile each time)
at batch ``--batch-size`` and ``--image-size``; int8 targets calibrate on one batch. Reported per target, medians
over the repeats: the whole ``fxforge.compile`` call, the ``calibrate`` pass (the calibration forward passes),
the compile time without it (the number to watch; also its minimum over the repeats, the least disturbed run
on a shared machine), and the slowest passes. Compile time still includes forward passes
on the example input: the eager reference (shape propagation), the final check and, for int8, the per-layer
SQNR report inside insert-qdq. The model is
random-init with random BatchNorm statistics (compile time does not depend on the values).

Run it:
    .venv/bin/python benchmarks/compile_time.py
    .venv/bin/python benchmarks/compile_time.py --targets cpu --repeats 3 --write
    .venv/bin/python benchmarks/compile_time.py --models resnet18 --targets cpu --passes   # every pass's time
Prints a markdown block; ``--write`` puts it into benchmarks/RESULTS.md between the ``compile-time:begin`` /
``compile-time:end`` markers (appended when missing; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import fxforge
from fxforge.testing.helpers import randomize_bn

BEGIN, END = "<!-- compile-time:begin -->", "<!-- compile-time:end -->"


def compile_once(model: torch.nn.Module, target: str, x: torch.Tensor) -> dict[str, float]:
    """Seconds: 'total' (the compile call), 'calibrate', 'excluding calibration', and one entry per pass."""
    kwargs = {} if target == "cpu" else dict(calibration=[x.clone()])
    start = time.perf_counter()
    compiled = fxforge.compile(model, target, example_inputs=x, **kwargs)
    total = time.perf_counter() - start
    passes = {f"pass {r.spec}": r.seconds for r in compiled.report.passes}
    calibrate = sum(r.seconds for r in compiled.report.passes if r.name == "calibrate")
    return {"total": total, "calibrate": calibrate, "excluding calibration": total - calibrate,
            "trace": compiled.report.trace_seconds, **passes}


def measure(name: str, target: str, batch: int, size: int, repeats: int) -> dict[str, float]:
    """Medians over the repeats, plus 'best excluding calibration' (the minimum: the least disturbed run)."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(batch, 3, size, size)
    runs = [compile_once(model, target, x) for _ in range(repeats)]
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    minima = {f"min {key}": min(run[key] for run in runs) for key in runs[0] if key.startswith("pass ")}
    return {**medians, **minima, "best excluding calibration": min(run["excluding calibration"] for run in runs)}


def render(results: dict[tuple[str, str], dict[str, float]], args: argparse.Namespace, load: float) -> str:
    lines = [BEGIN, "## Compile time (excluding calibration forward passes)", "",
             f"- command: `{shlex.join(sys.orig_argv)}`; torch {torch.__version__}, {torch.get_num_threads()} "
             f"thread(s), {os.cpu_count()} logical cores; 1-minute load average at start {load:.2f} (shared "
             f"cores slow everything down)",
             f"- model at batch {args.batch_size}, {args.image_size}x{args.image_size}; median of {args.repeats} "
             "compiles; int8 targets calibrate on one batch",
             "- still included: forward passes on the example input (the eager reference with shape propagation, "
             "the final check; for int8 the per-layer SQNR report inside insert-qdq, most of its time)", "",
             "| model | target | compile (s) | calibrate pass (s) | excluding calibration (s) | best of the runs (s) "
             "| slowest passes (s) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for (name, target), r in results.items():
        passes = sorted(((k[5:], v) for k, v in r.items() if k.startswith("pass ")), key=lambda kv: -kv[1])
        slowest = ", ".join(f"{k} {v:.2f}" for k, v in [("trace", r["trace"]), *passes[:3]])
        lines.append(f"| {name} | {target} | {r['total']:.2f} | {r['calibrate']:.2f} | "
                     f"{r['excluding calibration']:.2f} | {r['best excluding calibration']:.2f} | {slowest} |")
    return "\n".join([*lines, END]) + "\n"


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50")
    p.add_argument("--targets", default="cpu,x86,fbgemm,qnnpack")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--passes", action="store_true", help="also print every pass's median and minimum time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load = os.getloadavg()[0]
    results = {(m, t): measure(m, t, args.batch_size, args.image_size, args.repeats)
               for m in args.models.split(",") for t in args.targets.split(",")}
    block = render(results, args, load)
    print(block)
    if args.passes:  # every pass, median and minimum: where pass-API overheads would show
        for (name, target), r in results.items():
            print(f"{name} {target}: trace {r['trace'] * 1e3:.1f} ms")
            for key, seconds in r.items():
                if key.startswith("pass "):
                    print(f"  {key[5:]:<40} median {seconds * 1e3:8.2f} ms  min {r['min ' + key] * 1e3:8.2f} ms")
    if args.write:
        write_block(Path(__file__).with_name("RESULTS.md"), block)


if __name__ == "__main__":
    main()

"""AOTInductor packages against fxforge's FX runtime: latency of the same compiled model run three ways.

For each model (random-init torchvision classifiers, BatchNorm statistics re-estimated, ``bench_cpu.make_model``),
fp32 ``cpu`` target, batch ``--batch-size`` at 224x224: ``fxforge`` is the compiled model (the FX graph of oneDNN
modules with prepacked weights), ``pt2`` the ``torch.export`` program of it run by ``ep.module()`` (what
``compiled.export("m.pt2")`` writes: the same ops on dense weights), ``aoti`` the AOTInductor package of that
program (``compiled.export("m.aoti.pt2")``, loaded with ``torch._inductor.aoti_load_package``). The three are
timed interleaved by ``fxforge.numerics.timing`` (median of ``--rounds`` samples of ``--calls`` calls, after
``--warmup``) under ``torch.inference_mode``; errors are max relative errors against eager fp32; build times are
the compile, the export and the AOTInductor compile (which includes exporting again).

Run it:
    .venv/bin/python benchmarks/bench_aoti.py
    .venv/bin/python benchmarks/bench_aoti.py --models resnet18 --rounds 10 --write
Prints a markdown block; ``--write`` puts it into benchmarks/RESULTS.md between the ``aoti:begin`` /
``aoti:end`` markers (appended when missing; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_cpu import machine_info, make_model, rel_error, write_results

import fxforge
from fxforge.numerics import timing

BEGIN, END = "<!-- aoti:begin -->", "<!-- aoti:end -->"
MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_large")
RUNNERS = ("fxforge", "pt2", "aoti")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def build(name: str, x: torch.Tensor, folder: Path) -> tuple[dict[str, Callable], dict[str, float], torch.Tensor]:
    """({runner: callable}, {build step: seconds}, eager output) for one model."""
    model = make_model(name)
    with torch.inference_mode():
        eager = model(x)
    compiled, compile_s = timed(lambda: fxforge.compile(model, "cpu", example_inputs=(x,)))
    program_path, export_s = timed(lambda: compiled.export(folder / f"{name}.pt2", example_inputs=(x,)))
    package_path, aoti_s = timed(lambda: compiled.export(folder / f"{name}.aoti.pt2", example_inputs=(x,)))
    program = torch.export.load(program_path).module()
    package = torch._inductor.aoti_load_package(str(package_path))
    runners = {"fxforge": lambda: compiled(x), "pt2": lambda: program(x), "aoti": lambda: package(x)}
    return runners, {"compile": compile_s, "export": export_s, "aoti compile": aoti_s}, eager


def bench(name: str, x: torch.Tensor, schedule: timing.Schedule, folder: Path) -> dict[str, object]:
    runners, builds, eager = build(name, x, folder)
    with torch.inference_mode():
        errors = {r: rel_error(fn(), eager) for r, fn in runners.items()}
        seconds = timing.measure(runners, schedule)
    return {"model": name, "ms": {r: s * 1e3 for r, s in seconds.items()}, "errors": errors, "builds": builds}


def render(rows: list[dict[str, object]], info: list[str], batch: int) -> str:
    lines = [f"## AOTInductor package vs the FX runtime (fp32 `cpu`, batch {batch}, 224x224)", "", *info, "",
             "| model | fxforge ms | pt2 ms | aoti ms | aoti speed-up vs fxforge | max rel err fxforge / pt2 / aoti "
             "| compile s | export s | aoti compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ms, err, b = row["ms"], row["errors"], row["builds"]
        lines.append(f"| {row['model']} | {ms['fxforge']:.2f} | {ms['pt2']:.2f} | {ms['aoti']:.2f} | "
                     f"{ms['fxforge'] / ms['aoti']:.2f}x | {err['fxforge']:.1e} / {err['pt2']:.1e} / "
                     f"{err['aoti']:.1e} | {b['compile']:.1f} | {b['export']:.1f} | {b['aoti compile']:.1f} |")
    faster = [r["model"] for r in rows if r["ms"]["aoti"] < r["ms"]["fxforge"]]
    geo = statistics.geometric_mean([r["ms"]["fxforge"] / r["ms"]["aoti"] for r in rows])
    lines += ["", f"AOTI faster than the FX runtime on: {', '.join(faster) or 'none'} "
                  f"(geometric-mean speed-up {geo:.2f}x; > 1 means the package is faster)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--write", action="store_true", help="write the block into benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    schedule = timing.Schedule(warmup=args.warmup, rounds=args.rounds, calls=args.calls,
                               statistic=statistics.median)
    x = torch.randn(args.batch_size, 3, 224, 224)
    with tempfile.TemporaryDirectory() as folder:
        rows = [bench(name, x, schedule, Path(folder)) for name in args.models.split(",")]
    info = [line for line in machine_info(load_before) if not line.startswith("- threads")]
    info.append(f"- threads: {torch.get_num_threads()}; timing: median of {args.rounds} interleaved samples of "
                f"{args.calls} calls after {args.warmup} warm-up calls")
    body = render(rows, info, args.batch_size)
    print(body)
    if args.write:
        write_results(Path(__file__).with_name("RESULTS.md"), body, BEGIN, END, header=None)


if __name__ == "__main__":
    main()

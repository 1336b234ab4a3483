"""GPU inference benchmark: fxforge's CUDA targets against eager and torch.compile, side by side in one process.

Peers (``--peers``, default all), each built per (model, batch size) from a fresh copy of the model:
- ``eager_fp32``: the model as it is, torch's default flags (cuDNN may use TF32);
- ``eager_fp16_cl``: ``model.half()`` in channels-last, fed a channels-last fp16 input;
- ``compile_fp16`` / ``compile_ro_fp16``: ``torch.compile`` (mode "default" / "reduce-overhead", the latter
  with CUDA graphs) of that fp16 channels-last model; a cold compile (fresh inductor cache), counted as build;
- ``fx_cuda``, ``fx_bf16``: ``fxforge.compile(model, "cuda" / "cuda-bf16")`` fed the fp32 input (the casts to
  fp16/bf16 and back are inside the compiled graph, so they are timed too);
- ``fx_nocapture``: "cuda" with ``cuda-runtime{capture=false}`` (what CUDA graph capture is worth);
- ``fx_unfused``: "cuda" with ``lower-cuda{fused=false}`` (what the fused cuDNN kernels are worth).
Models are random-init torchvision classifiers with BatchNorm statistics re-estimated on random batches (no
download). Every peer is timed on the same input: ``--warmup`` untimed calls, then ``--repeats`` calls, each
between two CUDA events (the CPU's launch time shows when the GPU waits for it); the table gives the median
ms per batch. SQNR (dB) is each peer's output against eager fp32 with TF32 off, on the timed input. Build
time is the seconds to a ready module, first call included where that compiles or captures.

Run it on the GPU machine (``benchmarks/gpu_check.sh`` does, after the CUDA tests):
    python3 benchmarks/bench_cuda.py [--models resnet50,mobilenet_v2] [--batch-sizes 1,64]
Results are printed and written to ``benchmarks/RESULTS.md`` (``--out``) between the ``bench-cuda:begin`` /
``bench-cuda:end`` markers (appended at the end when missing); the last thing printed is a short table
(also written to ``--summary`` when given); both files are rewritten after every (model, batch size), so
a run stopped by a time limit keeps what it measured. ``--dry-run`` checks the script without a GPU: CPU,
perf_counter timings, the CUDA pipelines compiled for CPU graphs, torch.compile skipped, nothing written
unless ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from bench_cpu import Row, short, write_results
from torch import nn

import fxforge
from fxforge.backends.cuda_graphs import tf32_policy
from fxforge.numerics import timing
from fxforge.pipeline.fragments import with_options
from fxforge.quant.sqnr import outputs_sqnr_db
from fxforge.testing.helpers import reestimate_bn

BEGIN, END = "<!-- bench-cuda:begin -->", "<!-- bench-cuda:end -->"
CL = torch.channels_last
Runner = Callable[[torch.Tensor], torch.Tensor]
Builder = Callable[[nn.Module, torch.Tensor, bool], tuple[Runner, torch.Tensor]]


# ---------------------------------------------------------------------------------------------- peers
class Skipped(Exception):
    """A peer that does not run in this mode (its cell shows the message)."""


def build_eager_fp32(model: nn.Module, x: torch.Tensor, dry: bool) -> tuple[Runner, torch.Tensor]:
    return model, x


def build_eager_fp16_cl(model: nn.Module, x: torch.Tensor, dry: bool) -> tuple[Runner, torch.Tensor]:
    return model.half().to(memory_format=CL), x.half().contiguous(memory_format=CL)


def _fresh_inductor_cache():
    import torch._inductor.utils as utils

    fresh = getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache", None)
    return fresh() if fresh is not None else nullcontext()


def torch_compile(mode: str) -> Builder:
    def build(model: nn.Module, x: torch.Tensor, dry: bool) -> tuple[Runner, torch.Tensor]:
        if dry:
            raise Skipped("skipped (dry run)")
        import torch._dynamo

        half, xh = build_eager_fp16_cl(model, x, dry)
        torch._dynamo.reset()  # a fresh dynamo cache per (model, bs)
        compiled = torch.compile(half, mode=mode)
        with _fresh_inductor_cache():  # a cold compile, as fxforge's
            compiled(xh)
        return compiled, xh

    return build


def fxforge_target(target: str, options: tuple[str, dict[str, object]] | None = None) -> Builder:
    """fxforge.compile for ``target``, with ``options`` (pass name, {option: value}) set in its pipeline; on CPU
    (dry run) the same pipeline compiled for a CPU graph."""
    def build(model: nn.Module, x: torch.Tensor, dry: bool) -> tuple[Runner, torch.Tensor]:
        pipeline = fxforge.pipeline_for(target)
        if options is not None:
            pipeline = with_options(pipeline, options[0], **options[1])
        compiled = fxforge.compile(model, "cpu" if dry else target, example_inputs=x, pipeline=pipeline)
        return compiled, x

    return build


PEERS: dict[str, tuple[str, Builder]] = {
    "eager_fp32": ("eager fp32", build_eager_fp32),
    "eager_fp16_cl": ("eager fp16 channels-last", build_eager_fp16_cl),
    "compile_fp16": ("torch.compile default fp16", torch_compile("default")),
    "compile_ro_fp16": ("torch.compile reduce-overhead fp16", torch_compile("reduce-overhead")),
    "fx_cuda": ("fxforge cuda", fxforge_target("cuda")),
    "fx_bf16": ("fxforge cuda-bf16", fxforge_target("cuda-bf16")),
    "fx_nocapture": ("fxforge cuda, capture=false",
                     fxforge_target("cuda", ("cuda-runtime", {"capture": False}))),
    "fx_unfused": ("fxforge cuda, fused=false", fxforge_target("cuda", ("lower-cuda", {"fused": False}))),
}


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class Cell:
    ms: float | None = None
    sqnr_db: float | None = None
    build_s: float | None = None
    error: str | None = None


def call_times_ms(run: Runner, x: torch.Tensor, warmup: int, repeats: int, cuda: bool) -> list[float]:
    """Per-call times: CUDA events around each call on a GPU, perf_counter on the CPU."""
    call = functools.partial(run, x)
    seconds = timing.samples({"run": call}, timing.Schedule(warmup, repeats), timing.clock_for(cuda))["run"]
    return [s * 1e3 for s in seconds]


def _sync(dry: bool) -> None:
    if not dry:
        torch.cuda.synchronize()


def measure_peer(builder: Builder, model: nn.Module, x: torch.Tensor, reference: torch.Tensor,
                 args: argparse.Namespace) -> Cell:
    """Build (from ``model``, a copy of its own), check (SQNR against ``reference``) and time one peer under
    inference mode; a failure becomes the cell's error."""
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            run, inp = builder(model, x, args.dry_run)
            _sync(args.dry_run)
            build_s = time.perf_counter() - start
            sqnr = outputs_sqnr_db(reference, run(inp).float())
            times = call_times_ms(run, inp, args.warmup, args.repeats, cuda=not args.dry_run)
        return Cell(ms=statistics.median(times), sqnr_db=sqnr, build_s=build_s)
    except Skipped as exc:
        return Cell(error=str(exc))
    except Exception as exc:  # one peer failing must not stop the others
        return Cell(error=short(exc))


def make_model(name: str, image_size: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).to(device)
    batches = [torch.randn(8, 3, image_size, image_size, device=device) for _ in range(2)]
    return reestimate_bn(model, batches)


def bench_row(model: nn.Module, name: str, bs: int, peers: list[str], args: argparse.Namespace) -> Row:
    device = "cpu" if args.dry_run else "cuda"
    x = torch.randn(bs, 3, args.image_size, args.image_size, device=device,
                    generator=torch.Generator(device).manual_seed(bs))
    row = Row(name, bs)
    with torch.inference_mode(), tf32_policy(False):
        reference = model(x)
    for peer in peers:
        print(f"  {name} bs{bs}: {peer}", file=sys.stderr, flush=True)
        fresh = copy.deepcopy(model)  # outside inference mode: its parameters stay normal tensors
        row.cells[peer] = measure_peer(PEERS[peer][1], fresh, x, reference, args)
        del fresh
        if not args.dry_run:
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------- reporting
def fmt(cell: Cell, value: Callable[[Cell], str]) -> str:
    return cell.error if cell.error else value(cell)


def table(rows: list[Row], peers: list[str], value: Callable[[Cell], str]) -> list[str]:
    lines = ["| model | bs | " + " | ".join(PEERS[p][0] for p in peers) + " |", "|---|---:|" + "---:|" * len(peers)]
    for r in rows:
        lines.append(f"| {r.model} | {r.batch_size} | " + " | ".join(fmt(r.cells[p], value) for p in peers) + " |")
    return lines


def ratio(row: Row, peer: str, mine: str = "fx_cuda") -> str:
    a, b = row.cells.get(peer), row.cells.get(mine)
    if not a or not b or a.ms is None or b.ms is None:
        return "n/a"
    return f"{a.ms / b.ms:.2f}x"


def short_table(rows: list[Row]) -> list[str]:
    """The headline numbers: fxforge cuda against torch.compile reduce-overhead."""
    lines = ["| model | bs | compile r-o fp16 ms | fxforge cuda ms | r-o / fxforge | fxforge SQNR dB | "
             "fxforge build s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ro, fx = r.cells.get("compile_ro_fp16", Cell(error="not run")), r.cells.get("fx_cuda", Cell(error="not run"))
        lines.append(f"| {r.model} | {r.batch_size} | {fmt(ro, lambda c: f'{c.ms:.3f}')} | "
                     f"{fmt(fx, lambda c: f'{c.ms:.3f}')} | {ratio(r, 'compile_ro_fp16')} | "
                     f"{fmt(fx, lambda c: f'{c.sqnr_db:.1f}')} | {fmt(fx, lambda c: f'{c.build_s:.2f}')} |")
    return lines


def machine_info(args: argparse.Namespace) -> list[str]:
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}), "
        f"torchvision {torchvision.__version__}, fxforge {fxforge.__version__}, Python {platform.python_version()}",
        f"- command: `{shlex.join(sys.orig_argv)}`",
        f"- {args.warmup} warm-up calls, median of {args.repeats} timed calls per peer; input "
        f"{args.image_size}x{args.image_size}",
    ]


def render(rows: list[Row], peers: list[str], info: list[str]) -> str:
    fx_peers = [p for p in peers if p != "fx_cuda"]
    speedups = ["| model | bs | " + " | ".join(PEERS[p][0] for p in fx_peers) + " |",
                "|---|---:|" + "---:|" * len(fx_peers)]
    speedups += [f"| {r.model} | {r.batch_size} | " + " | ".join(ratio(r, p) for p in fx_peers) + " |" for r in rows]
    sections = [
        ("Median latency (ms per batch, CUDA events; lower is better)", table(rows, peers, lambda c: f"{c.ms:.3f}")),
        ("fxforge cuda speed-up (peer ms / fxforge cuda ms; >1 means fxforge is faster)",
         speedups if "fx_cuda" in peers else []),
        ("SQNR vs eager fp32 with TF32 off (dB, higher is better)", table(rows, peers, lambda c: f"{c.sqnr_db:.1f}")),
        ("Build time (s; torch.compile: cold compile and first call; fxforge: compile, first call captured)",
         table(rows, peers, lambda c: f"{c.build_s:.2f}")),
    ]
    parts = [*info, ""]
    for title, lines in sections:
        if lines:
            parts += [f"### {title}", "", *lines, ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,mobilenet_v2", help="comma-separated torchvision model names")
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/RESULTS.md; "
                                                          "a dry run writes nothing unless given)")
    p.add_argument("--summary", type=Path, default=None, help="also write the short table here")
    p.add_argument("--dry-run", action="store_true", help="check the script on CPU (see the docstring)")
    args = p.parse_args(argv)
    unknown = set(args.peers.split(",")) - set(PEERS)
    if unknown:
        p.error(f"unknown peers {sorted(unknown)}; choose from {','.join(PEERS)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA GPU visible to torch: run it on a GPU machine, or pass --dry-run")
    if args.out is None and not args.dry_run:
        args.out = Path(__file__).with_name("RESULTS.md")
    return args


def report(rows: list[Row], peers: list[str], args: argparse.Namespace, final: bool) -> None:
    """Write the results so far (after every row: a run stopped by a time limit keeps what it measured);
    print them when ``final``, the short table last."""
    body = render(rows, peers, machine_info(args))
    summary = "\n".join(short_table(rows))
    if args.out is not None:
        write_results(args.out, body, BEGIN, END, header=None)
    if args.summary is not None:
        args.summary.write_text(summary + "\n")
    if final:
        print(body)
        if args.out is not None:
            print(f"wrote {args.out}", file=sys.stderr)
        print(f"\n{machine_info(args)[1][2:]}\n{summary}")


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    peers = list(dict.fromkeys(args.peers.split(",")))
    rows: list[Row] = []
    for name in args.models.split(","):
        model = make_model(name, args.image_size, "cpu" if args.dry_run else "cuda")
        for bs in args.batch_sizes.split(","):
            rows.append(bench_row(model, name, int(bs), peers, args))
            report(rows, peers, args, final=False)
    report(rows, peers, args, final=True)
    return rows


if __name__ == "__main__":
    main()

"""CPU fp32 inference benchmark: fxforge against its peers, side by side in one process on the same inputs.

Peers (``--peers``, default all): ``eager`` (fp32, the reference), ``eager_cl`` (channels_last),
``jit`` (torch.jit.script + freeze + optimize_for_inference; torch.jit.trace when script fails),
``ort`` (onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL), ``openvino`` (OpenVINO's CPU plugin on the model
converted by ``openvino.convert_model``: fp32 inference precision, latency hint, torch's thread count; recorded
as ``skipped: openvino not installed`` without the package, which only the ``bench`` extra installs:
``pip install -e ".[bench]"``), ``inductor`` (torch.compile with
``torch._inductor.config.freezing = True``), ``fxforge`` (``fxforge.compile(model, "cpu", ...)``) and
``fxforge_bf16`` (``"cpu-bf16"``: bf16 on oneDNN; only on CPUs with AMX or AVX512-BF16, elsewhere recorded as
``skipped: no AMX/AVX512-BF16``, never timed emulated), ``fx_openvino`` (``"openvino"``: fxforge's graph passes,
OpenVINO's CPU runtime; skipped without openvino). vit_b_16 exercises the attention-to-sdpa rewrite.

Models are random-init torchvision classifiers (no weights are downloaded) with BatchNorm statistics
re-estimated on random batches and random weights in heads torchvision zero-initializes (vit_b_16's), so outputs
do not vanish and relative errors mean something. Every peer is
built per (model, batch size) and checked against eager fp32 on the same input; then all peers are timed
under ``torch.inference_mode``, one peer after another: ``--warmup`` untimed calls, then ``--repeats`` timed
ones back to back (see ``time_blocks`` for why not interleaved). Run it on an otherwise idle machine. The
tables report the median latency, fxforge's speed-up (peer_ms / fxforge_ms, >1 means fxforge is faster),
the max relative error against eager fp32 (max|a-b| / max|b|) and the build time. A peer that fails is
recorded as ``failed: <reason>`` and the run goes on.

Run it (``make bench`` does the first):
    .venv/bin/python benchmarks/bench_cpu.py
    .venv/bin/python benchmarks/bench_cpu.py --models resnet18 --batch-sizes 1 --peers eager,fxforge
Results are printed and written to ``benchmarks/RESULTS.md`` (``--out``) between the ``bench:begin`` /
``bench:end`` markers; text outside the markers (notes) is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import importlib.metadata
import importlib.util
import io
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from tqdm import tqdm

import fxforge
from fxforge.numerics import timing
from fxforge.testing.helpers import reestimate_bn

Runner = Callable[[torch.Tensor], torch.Tensor]
Builder = Callable[[nn.Module, torch.Tensor], Runner]

DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,vit_b_16"
# Timed and untimed calls per peer and batch size (other sizes use the bs32 counts): the full default run took 9 min
# on 2 lightly shared cores, 20 min on heavily shared ones. Every peer also makes one untimed call after its
# build (the accuracy check).
DEFAULT_REPEATS = {1: 50, 32: 5}
DEFAULT_WARMUP = {1: 5, 32: 1}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


# ---------------------------------------------------------------------------------------------- models
@torch.no_grad()
def randomize_zero_heads(model: nn.Module) -> nn.Module:
    """torchvision zero-initializes some classifier heads (vit_*: ``heads.head``): the output is then all zeros and
    every peer's error reads 0. Such Linear layers get random weights (in place; returns ``model``)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
    return model


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_zero_heads(torchvision.models.get_model(name, weights=None))
    batches = [torch.randn(8, 3, 224, 224) for _ in range(2)]
    return reestimate_bn(model, batches)


# ---------------------------------------------------------------------------------------------- peers
def build_eager(model: nn.Module, x: torch.Tensor) -> Runner:
    return model


def build_eager_cl(model: nn.Module, x: torch.Tensor) -> Runner:
    cl = torch.channels_last
    model_cl = model.to(memory_format=cl)  # in place; bench_model hands every peer its own copy
    return lambda inp: model_cl(inp.contiguous(memory_format=cl))


def build_jit(model: nn.Module, x: torch.Tensor) -> Runner:
    try:
        scripted = torch.jit.script(model)
    except Exception:  # torchvision models with untyped Python constructs: trace instead
        scripted = torch.jit.trace(model, x, check_trace=False)
    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))
    return frozen


def _export_onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    """ONNX bytes: the legacy TorchScript exporter first (more robust), then the dynamo one."""
    errors = []
    for dynamo in (False, True):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), buf, dynamo=dynamo, input_names=["x"], output_names=["y"])
            return buf.getvalue()
        except Exception as exc:  # try the other exporter, report both if neither works
            errors.append(f"dynamo={dynamo}: {short(exc)}")
    raise RuntimeError("onnx export failed: " + "; ".join(errors))


def ort_session(onnx_model: bytes | str, profile_prefix: str | None = None) -> object:
    """An onnxruntime CPU session at ORT_ENABLE_ALL with torch's intra-op thread count; ``profile_prefix``: write
    ORT's profile (``SessionOptions.enable_profiling``) to a JSON file starting with it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])


def ort_runner(session: object) -> Runner:
    return lambda inp: torch.from_numpy(session.run(None, {"x": inp.numpy()})[0])


def build_ort(model: nn.Module, x: torch.Tensor) -> Runner:
    return ort_runner(ort_session(_export_onnx(model, x)))


def openvino_model(model: nn.Module, x: torch.Tensor) -> object:
    """``model`` converted by OpenVINO's PyTorch front end, its input fixed to ``x``'s shape (as the ONNX export).
    Raises PeerSkipped when openvino is not installed."""
    if importlib.util.find_spec("openvino") is None:
        raise PeerSkipped("openvino not installed")
    import openvino as ov

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return ov.convert_model(model, example_input=x, input=[tuple(x.shape)])


def openvino_compiled(ov_model: object, perf_counters: bool = False) -> object:
    """``ov_model`` compiled for OpenVINO's CPU plugin: torch's thread count, latency mode, fp32 precision (the
    plugin's default on bf16-capable CPUs is bf16); ``perf_counters``: per-layer times (PERF_COUNT)."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": perf_counters}
    return ov.Core().compile_model(ov_model, "CPU", config)


def openvino_runner(compiled: object) -> Runner:
    request = compiled.create_infer_request()
    return lambda inp: torch.from_numpy(request.infer({0: inp.numpy()})[0])


def build_openvino(model: nn.Module, x: torch.Tensor) -> Runner:
    return openvino_runner(openvino_compiled(openvino_model(model, x)))


def build_inductor(model: nn.Module, x: torch.Tensor) -> Runner:
    import torch._dynamo
    import torch._inductor.config
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()  # a fresh dynamo cache per (model, bs): no recompile limits
    torch._inductor.config.freezing = True
    compiled = torch.compile(model, backend="inductor", mode="default")
    with fresh_cache():  # a cold compile, as fxforge's: no on-disk kernels or graphs from earlier runs
        compiled(x)  # compilation happens on the first call; count it as setup
    return compiled


def build_fxforge(model: nn.Module, x: torch.Tensor) -> Runner:
    return fxforge.compile(model, "cpu", example_inputs=x)


class PeerSkipped(Exception):
    """A peer that cannot run on this machine by design (recorded as ``skipped: <reason>``, not as a failure)."""


def build_fxforge_bf16(model: nn.Module, x: torch.Tensor) -> Runner:
    from fxforge.backends.cpu_bf16 import hardware_unavailable_reason

    if hardware_unavailable_reason() is not None:  # FXFORGE_CPU_BF16_EMULATE does not count: no emulated timings
        raise PeerSkipped("no AMX/AVX512-BF16")
    return fxforge.compile(model, "cpu-bf16", example_inputs=x)


def build_fx_openvino(model: nn.Module, x: torch.Tensor, target: str = "openvino", **options: object) -> Runner:
    """fxforge's OpenVINO targets ("openvino"; bench_int8: "openvino-int8" with ``calibration=``): fxforge's graph
    passes (and quantization), OpenVINO's CPU runtime. Raises PeerSkipped when openvino is not installed."""
    if importlib.util.find_spec("openvino") is None:
        raise PeerSkipped("openvino not installed")
    return fxforge.compile(model, target, example_inputs=x, **options)


PEERS: dict[str, Builder] = {
    "eager": build_eager,
    "eager_cl": build_eager_cl,
    "jit": build_jit,
    "ort": build_ort,
    "openvino": build_openvino,
    "inductor": build_inductor,
    "fxforge": build_fxforge,
    "fxforge_bf16": build_fxforge_bf16,
    "fx_openvino": build_fx_openvino,
}


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class Cell:
    """One peer on one (model, batch size): median ms and spread, max rel. error vs eager, build seconds."""

    ms: float | None = None
    rel_err: float | None = None
    setup_s: float | None = None
    spread: float | None = None  # interquartile range / median of the timed calls
    best_ms: float | None = None
    error: str | None = None
    skipped: str | None = None  # why the peer does not run on this machine (PeerSkipped)


@dataclass
class Row:
    model: str
    batch_size: int
    cells: dict[str, Cell] = field(default_factory=dict)


def short(exc: BaseException, limit: int = 80) -> str:
    """A one-line reason: exception type and the first line of its message, truncated."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def build_peer(builder: Builder, model: nn.Module, x: torch.Tensor,
               ref: torch.Tensor) -> tuple[Runner | None, Cell]:
    """Build one peer and check it against ``ref``; a failure gives ``(None, Cell(error=...))``."""
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = builder(model, x)
        setup_s = time.perf_counter() - start
        return run, Cell(rel_err=rel_error(run(x), ref), setup_s=setup_s)
    except PeerSkipped as exc:
        return None, Cell(skipped=str(exc))
    except Exception as exc:  # one peer failing must not stop the others
        return None, Cell(error=short(exc))


def time_blocks(runners: dict[str, Runner], x: torch.Tensor, warmup: int, repeats: int,
                bar: tqdm) -> dict[str, list[float] | str]:
    """Per-peer call times (ms): each peer's warm-up and timed calls back to back, one peer after another.

    Not interleaved: onnxruntime's and OpenMP's worker threads spin for a while after a call, and on 2 cores
    that spinning slowed whichever peer ran next (medians 1.5-2x the fastest call in an interleaved run).
    A peer that raises drops out with its reason.
    """
    results: dict[str, list[float] | str] = {}
    for name, run in runners.items():
        try:
            seconds = timing.samples({name: functools.partial(run, x)}, timing.Schedule(warmup, repeats))[name]
            times = [s * 1e3 for s in seconds]
        except Exception as exc:  # e.g. a recompile that fails late: the peer fails, the run goes on
            times = "while timing: " + short(exc)
        results[name] = times
        bar.update(warmup + repeats)
    return results


def summarize(cell: Cell, result: list[float] | str) -> None:
    """Median, minimum and interquartile spread (relative to the median) into ``cell``, or the failure."""
    if isinstance(result, str) or not result:
        cell.error = result or "no timed calls"
        return
    cell.ms, cell.best_ms = statistics.median(result), min(result)
    q = statistics.quantiles(result, n=4) if len(result) > 1 else [result[0]] * 3
    cell.spread = (q[2] - q[0]) / cell.ms


def per_batch(defaults: dict[int, int], batch_size: int, override: int | None) -> int:
    return override if override is not None else defaults.get(batch_size, defaults[32])


def bench_row(base: nn.Module, name: str, bs: int, peers: list[str], warmup: int, repeats: int,
              bar: tqdm) -> Row:
    x = torch.randn(bs, 3, 224, 224, generator=torch.Generator().manual_seed(bs))
    row, runners = Row(name, bs), {}
    with torch.inference_mode():
        ref = base(x)
    for peer in peers:
        bar.set_postfix_str(f"{name} bs{bs} build {peer}")
        model = copy.deepcopy(base)  # a fresh copy per peer: some builders convert the model in place
        with torch.inference_mode():
            run, row.cells[peer] = build_peer(PEERS[peer], model, x, ref)
        if run is not None:
            runners[peer] = run
        bar.update()
    bar.set_postfix_str(f"{name} bs{bs} timing")
    with torch.inference_mode():
        results = time_blocks(runners, x, warmup, repeats, bar)
    for peer, result in results.items():
        summarize(row.cells[peer], result)
    return row


def bench_model(name: str, batch_sizes: list[int], peers: list[str], repeats: int | None,
                warmup: int | None, bar: tqdm) -> list[Row]:
    base = make_model(name)  # outside inference_mode: its parameters must stay normal tensors
    return [bench_row(base, name, bs, peers, per_batch(DEFAULT_WARMUP, bs, warmup),
                      per_batch(DEFAULT_REPEATS, bs, repeats), bar) for bs in batch_sizes]


# ---------------------------------------------------------------------------------------------- reporting
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or "unknown"


def optional_versions(packages: tuple[str, ...] = ("openvino", "nncf")) -> str:
    """"openvino X, nncf Y, " for the optional peers' packages that are installed."""
    found = []
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}, ")
    return "".join(found)


def machine_info(load_before: float) -> list[str]:
    import onnxruntime as ort

    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical cores, "
        f"ISA: {torch.backends.cpu.get_cpu_capability()}, {platform.system()} {platform.release()}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {ort.__version__}, "
        f"{optional_versions()}fxforge {fxforge.__version__}, Python {platform.python_version()}",
        f"- threads: {torch.get_num_threads()} (torch intra-op; ORT intra_op_num_threads and OpenVINO "
        "INFERENCE_NUM_THREADS the same)",
        f"- command: `{shlex.join(sys.orig_argv)}`",
        f"- 1-minute load average at start / end: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        f"(the end value includes this run; well above {torch.get_num_threads()} means shared cores)",
    ]


def fmt_cell(cell: Cell, fmt: Callable[[Cell], str]) -> str:
    if cell.skipped:
        return f"skipped: {cell.skipped}"
    return f"failed: {cell.error}" if cell.error else fmt(cell)


def table(rows: list[Row], columns: list[str], value: Callable[[Row, str], str]) -> list[str]:
    lines = ["| model | bs | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {r.model} | {r.batch_size} | " + " | ".join(value(r, c) for c in columns) + " |")
    return lines


def speedup(row: Row, peer: str) -> float | None:
    mine, theirs = row.cells.get("fxforge"), row.cells.get(peer)
    if not mine or not theirs or mine.ms is None or theirs.ms is None:
        return None
    return theirs.ms / mine.ms


def speedup_lines(rows: list[Row], peers: list[str]) -> list[str]:
    others = [p for p in peers if p != "fxforge"]
    if "fxforge" not in peers or not others:
        return []

    def value(row: Row, peer: str) -> str:
        s = speedup(row, peer)
        return "n/a" if s is None else f"{s:.2f}x"

    lines = table(rows, others, value)
    geo = []
    for peer in others:
        ratios = [s for r in rows if (s := speedup(r, peer)) is not None]
        geo.append(f"{math.exp(statistics.fmean(map(math.log, ratios))):.2f}x" if ratios else "n/a")
    return [*lines, "| **geomean** | | " + " | ".join(geo) + " |"]


def render(rows: list[Row], peers: list[str], info: list[str]) -> str:
    def cell(fmt: Callable[[Cell], str]) -> Callable[[Row, str], str]:
        return lambda row, peer: fmt_cell(row.cells[peer], fmt)

    sections = [
        ("Median latency (ms, lower is better; ± is the interquartile range / median of the timed calls)",
         table(rows, peers, cell(lambda c: f"{c.ms:.2f} ±{c.spread:.0%}"))),
        ("Fastest timed call (ms; the least disturbed by other load, shown for reference only)",
         table(rows, peers, cell(lambda c: f"{c.best_ms:.2f}"))),
        ("fxforge speed-up (peer ms / fxforge ms; >1 means fxforge is faster)", speedup_lines(rows, peers)),
        ("Max relative error vs eager fp32 (max|a-b| / max|b|)",
         table(rows, peers, cell(lambda c: f"{c.rel_err:.1e}"))),
        ("Build / compile time (s, including export and first call where that compiles)",
         table(rows, peers, cell(lambda c: f"{c.setup_s:.1f}"))),
    ]
    parts = [*info, ""]
    for title, lines in sections:
        if lines:
            parts += [f"### {title}", "", *lines, ""]
    return "\n".join(parts)


RESULTS_HEADER = "# fxforge CPU benchmark results\n\nWritten by `benchmarks/bench_cpu.py`.\n\n"


def write_results(path: Path, body: str, begin: str = BEGIN, end: str = END,
                  header: str | None = RESULTS_HEADER) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path``. Without the markers, the block goes after
    ``header`` at the top (a new file gets the header), or at the end of the file when ``header`` is None."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif header is not None:
        text = header + block + "\n" + text
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------------------------- main
def argument_parser(peers: dict[str, Builder]) -> argparse.ArgumentParser:
    """The options every benchmark script shares (models, batch sizes, peers, repeats, threads, output)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated torchvision model names")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--peers", default=",".join(peers), help=f"subset of {','.join(peers)}")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls per peer (default {DEFAULT_REPEATS} by batch size)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed calls per peer before timing (default {DEFAULT_WARMUP} by batch size)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    return p


def check_peers(p: argparse.ArgumentParser, args: argparse.Namespace, peers: dict[str, Builder]) -> None:
    unknown = set(args.peers.split(",")) - set(peers)
    if unknown:
        p.error(f"unknown peers {sorted(unknown)}; choose from {','.join(peers)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(PEERS)
    args = p.parse_args(argv)
    check_peers(p, args, PEERS)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    models, peers = args.models.split(","), list(dict.fromkeys(args.peers.split(",")))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    calls = [per_batch(DEFAULT_WARMUP, bs, args.warmup) + per_batch(DEFAULT_REPEATS, bs, args.repeats)
             for bs in batch_sizes]
    steps = sum(len(peers) * (1 + n) for n in calls)  # a build and the calls, per peer and batch size
    rows: list[Row] = []
    with tqdm(total=len(models) * steps, file=sys.stderr) as bar:
        for name in models:
            rows += bench_model(name, batch_sizes, peers, args.repeats, args.warmup, bar)
    body = render(rows, peers, machine_info(load_before))
    print(body)
    write_results(args.out, body)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

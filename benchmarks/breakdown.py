"""Per-model time breakdown: where a compiled fxforge model's time goes, beside ONNX Runtime's and OpenVINO's.

For one torchvision model, batch size and fxforge target, three engines run the same model on the same input:
- ``fxforge``: ``fxforge.compile(model, target)``; torch.profiler's self-CPU time and call count per op;
- ``ort``: onnxruntime (bench_cpu's session) with ``SessionOptions.enable_profiling``: per-node kernel times;
- ``openvino``: OpenVINO's CPU plugin (bench_cpu's settings) with ``PERF_COUNT``: per-layer real times.
An int8 target (``x86``, ``fbgemm``, ``qnnpack``) is compared with the int8 peers of bench_int8 (onnxruntime
``quantize_static``, NNCF) on the same calibration batches.

Every op, node or layer falls into one category (``CATEGORIES``: kernels; quantize/dequantize; requantize;
layout: copies, reorders, transposes; dispatch/alloc: wrappers and allocations; other ops) by its name.
Each engine's *wall* time is the median of ``--forwards`` unprofiled calls; the *profiled forward* is the mean
of the ``--forwards`` profiled ones, and what the profiler does not attribute to an op (profiled forward minus
the sum of the op times) is the ``overhead`` row: for fxforge the Python code of the graph, module calls and the
part of dispatch outside the ops, for the peers their executor between nodes. Profilers slow what they time
(torch.profiler most, per op): read the rows against each other, and the wall row for the real speed. Other
jobs on the cores inflate everything: compare engines within one run.

Run (batch 1, torch's threads): ``.venv/bin/python benchmarks/breakdown.py mobilenet_v3_large``
(``--target x86``, ``--engines fxforge,ort``, ``--forwards N``, ``--rows N``, ``--threads N``). OpenVINO needs
the ``bench`` extra (``pip install -e ".[bench]"``); without it that engine is left out with a note.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_cpu import PeerSkipped, _export_onnx, make_model, openvino_compiled, openvino_model, ort_session
from bench_int8 import make_calibration, openvino_int8_model, ort_int8_model
from torch import nn

import fxforge
from fxforge.numerics import timing

OVERHEAD, OTHER = "overhead", "other ops"
# (category, pattern on the op / node type / layer type name), first match wins; the three engines' vocabularies
CATEGORIES: list[tuple[str, str]] = [
    ("dispatch/alloc", r"^aten::(conv2d|convolution|_convolution|linear|matmul|empty|empty_strided|empty_like"
                       r"|resize_|detach|alias|lift_fresh|zeros|zero_|_empty_affine_quantized"
                       r"|_empty_per_channel_affine_quantized)$"),
    (OTHER, r"^QLinear(?!Conv|MatMul)"),  # ONNX int8 elementwise ops (QLinearAdd, ...), not kernels
    ("requantize", r"(?i)requant"),
    ("quantize/dequantize", r"(?i)quantize_per|dequantize|quantizelinear|fakequantize|^convert$"),
    ("kernel", r"(?i)conv|linear|gemm|addmm|^aten::b?mm$|matmul|fullyconnected|scaled_dot_product|attention"),
    ("layout", r"(?i)copy|clone|contiguous|^aten::to$|permute|transpose|^aten::t$|reshape|view|as_strided|expand"
               r"|reorder|squeeze|flatten|to_dense|to_mkldnn"),
]
ORDER = ["kernel", "quantize/dequantize", "requantize", "layout", OTHER, "dispatch/alloc", OVERHEAD]


def category(name: str) -> str:
    """The category of an op (``aten::copy_``), an ONNX node type (``QuantizeLinear``) or an OpenVINO layer type."""
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, name)), OTHER)


@dataclass(frozen=True)
class OpTime:
    ms: float  # per forward
    calls: float  # per forward


@dataclass
class Breakdown:
    """One engine's time per forward: wall, per op and per category (``OVERHEAD``: the profiled forwards' time
    minus the ops')."""

    engine: str
    wall_ms: float  # median of unprofiled forwards
    profiled_ms: float  # mean of the profiled forwards
    ops: dict[str, OpTime]
    graph_calls: int | None = None  # calls in the graph's code per forward (fxforge)
    categories: dict[str, OpTime] = field(init=False)

    def __post_init__(self) -> None:
        totals: dict[str, list[float]] = {}
        for name, op in self.ops.items():
            total = totals.setdefault(category(name), [0.0, 0.0])
            total[0], total[1] = total[0] + op.ms, total[1] + op.calls
        totals[OVERHEAD] = [max(self.profiled_ms - sum(op.ms for op in self.ops.values()), 0.0), 0.0]
        self.categories = {c: OpTime(*totals[c]) for c in ORDER if c in totals}


def wall_ms(run: Callable[[], object], forwards: int) -> float:
    """Median ms of ``forwards`` calls after 3 warm-up calls (numerics.timing's loop)."""
    return timing.measure({"": run}, timing.Schedule(3, forwards, statistic=statistics.median))[""] * 1e3


def timed(run: Callable[[], object], forwards: int) -> float:
    """Mean ms of ``forwards`` calls of ``run`` (the profiled ones)."""
    return sum(timing.wall_clock(run) for _ in range(forwards)) * 1e3 / forwards


def _per_forward(times: dict[str, list[float]], forwards: int) -> dict[str, OpTime]:
    """{name: [total ms, calls]} over ``forwards`` forwards -> {name: OpTime per forward}."""
    return {name: OpTime(ms / forwards, calls / forwards) for name, (ms, calls) in times.items()}


def fxforge_breakdown(compiled: fxforge.CompiledModule, x: torch.Tensor, forwards: int) -> Breakdown:
    """torch.profiler self-CPU time per op of a compiled fxforge model."""
    with torch.inference_mode():
        wall = wall_ms(lambda: compiled(x), forwards)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = timed(lambda: compiled(x), forwards)
    times = {e.key: [e.self_cpu_time_total / 1e3, e.count] for e in prof.key_averages()}
    graph = compiled.graph_module.graph
    calls = sum(1 for n in graph.nodes if n.op in ("call_module", "call_function", "call_method"))
    return Breakdown("fxforge", wall, profiled, _per_forward(times, forwards), calls)


def ort_breakdown(onnx_model: bytes, x: torch.Tensor, forwards: int) -> Breakdown:
    """onnxruntime's profile: kernel time per node type over the last ``forwards`` of its runs."""
    feed = {"x": x.numpy()}
    session = ort_session(onnx_model)
    wall = wall_ms(lambda: session.run(None, feed), forwards)
    with tempfile.TemporaryDirectory() as tmp:
        profiled = ort_session(onnx_model, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(3 + forwards):
            profiled.run(None, feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][-forwards:]
    start, profiled = runs[0]["ts"], sum(e["dur"] for e in runs) / 1e3 / len(runs)
    times: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            total = times.setdefault(e["args"]["op_name"], [0.0, 0])
            total[0], total[1] = total[0] + e["dur"] / 1e3, total[1] + 1
    return Breakdown("ort", wall, profiled, _per_forward(times, forwards))


def openvino_breakdown(ov_model: object, x: torch.Tensor, forwards: int) -> Breakdown:
    """OpenVINO's per-layer perf counters (PERF_COUNT), summed per layer type over ``forwards`` inferences."""
    feed = {0: x.numpy()}
    request = openvino_compiled(ov_model).create_infer_request()
    wall = wall_ms(lambda: request.infer(feed), forwards)
    profiled = openvino_compiled(ov_model, perf_counters=True).create_infer_request()
    for _ in range(3):
        profiled.infer(feed)
    times: dict[str, list[float]] = {}
    seconds = 0.0
    for _ in range(forwards):
        seconds += timing.wall_clock(lambda: profiled.infer(feed))
        for layer in profiled.get_profiling_info():  # the last inference's counters
            if layer.status.name == "EXECUTED":
                total = times.setdefault(layer.node_type, [0.0, 0])
                total[0], total[1] = total[0] + layer.real_time.total_seconds() * 1e3, total[1] + 1
    return Breakdown("openvino", wall, seconds * 1e3 / forwards, _per_forward(times, forwards))


ENGINES = ("fxforge", "ort", "openvino")


def breakdowns(model: nn.Module, x: torch.Tensor, target: str = "cpu", engines: tuple[str, ...] = ENGINES,
               calibration: list[torch.Tensor] | None = None, forwards: int = 10) -> dict[str, Breakdown | str]:
    """{engine: its Breakdown, or why it was left out} for ``model`` on ``x``; each engine gets its own copy.
    ``calibration``: the batches an int8 ``target`` and the int8 peers calibrate on (None: fp32 peers)."""
    def build(engine: str, m: nn.Module) -> Breakdown:
        if engine == "fxforge":
            return fxforge_breakdown(fxforge.compile(m, target, example_inputs=x, calibration=calibration), x,
                                     forwards)
        if engine == "ort":
            onnx = _export_onnx(m, x) if calibration is None else ort_int8_model(m, x, calibration)
            return ort_breakdown(onnx, x, forwards)
        ov = openvino_model(m, x) if calibration is None else openvino_int8_model(m, x, calibration)
        return openvino_breakdown(ov, x, forwards)

    results: dict[str, Breakdown | str] = {}
    for engine in engines:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                results[engine] = build(engine, copy.deepcopy(model))
            except PeerSkipped as exc:
                results[engine] = f"left out: {exc}"
    return results


# ---------------------------------------------------------------------------------------------- reporting
def category_table(results: dict[str, Breakdown | str]) -> list[str]:
    """Categories x engines: ms per forward (calls per forward), then the wall time and fxforge's graph calls."""
    done = {name: b for name, b in results.items() if isinstance(b, Breakdown)}
    lines = ["| category | " + " | ".join(f"{n} ms (calls)" for n in done) + " |", "|---|" + "---:|" * len(done)]
    for cat in ORDER:
        cells = [b.categories.get(cat) for b in done.values()]
        if any(cells):
            lines.append(f"| {cat} | " + " | ".join("-" if c is None else f"{c.ms:.2f} ({c.calls:g})" for c in cells)
                         + " |")
    lines.append("| profiled forward | " + " | ".join(f"{b.profiled_ms:.2f}" for b in done.values()) + " |")
    lines.append("| **wall, unprofiled** | " + " | ".join(f"**{b.wall_ms:.2f}**" for b in done.values()) + " |")
    graph = [b.graph_calls for b in done.values()]
    if any(g is not None for g in graph):
        lines.append("| graph calls | " + " | ".join("" if g is None else str(g) for g in graph) + " |")
    return lines + [f"- {name}: {why}" for name, why in results.items() if isinstance(why, str)]


def op_table(b: Breakdown, rows: int) -> list[str]:
    lines = [f"| {b.engine} op | category | ms | calls |", "|---|---|---:|---:|"]
    for name, op in sorted(b.ops.items(), key=lambda item: -item[1].ms)[:rows]:
        lines.append(f"| {name} | {category(name)} | {op.ms:.3f} | {op.calls:g} |")
    return lines


def render(title: str, results: dict[str, Breakdown | str], rows: int) -> str:
    parts = [f"### {title}", "", *category_table(results), ""]
    for b in results.values():
        if isinstance(b, Breakdown):
            parts += [*op_table(b, rows), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Breakdown | str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="torchvision model name, e.g. mobilenet_v3_large")
    p.add_argument("--target", default="cpu", help="fxforge target: cpu, or an int8 one (x86, fbgemm, qnnpack)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--forwards", type=int, default=20, help="timed and profiled forwards per engine")
    p.add_argument("--calibration-batches", type=int, default=2, help="int8 targets: batches of 8 images")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rows", type=int, default=12, help="ops listed per engine, slowest first")
    p.add_argument("--image-size", type=int, default=224, help="input height and width (smoke runs: 32)")
    args = p.parse_args(argv)
    engines = tuple(dict.fromkeys(args.engines.split(",")))
    if set(engines) - set(ENGINES):
        p.error(f"unknown engines {sorted(set(engines) - set(ENGINES))}; choose from {','.join(ENGINES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.image_size
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(args.batch_size))
    int8 = args.target != "cpu"
    calibration = make_calibration(args.calibration_batches, size) if int8 else None
    results = breakdowns(make_model(args.model), x, args.target, engines, calibration, args.forwards)
    title = (f"{args.model}, batch {args.batch_size}, {size}x{size}, {torch.get_num_threads()} thread(s), "
             f"fxforge {args.target} against {'int8' if int8 else 'fp32'} peers: ms per forward (calls)")
    print(render(title, results, args.rows))
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()

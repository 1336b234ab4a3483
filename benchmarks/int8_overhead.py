"""Per-call overhead of fxforge's lowered int8 graphs: node and call counts, and the share of a call spent
outside the ops (Python and dispatch), measured on a tiny input so that the kernels themselves are cheap.

Run: ``.venv/bin/python benchmarks/int8_overhead.py [model ...]`` (default resnet18 mobilenet_v2; 1 thread).
The op time is the profiler's self CPU time of all ops; the profiler adds a little overhead of its own, so
the Python/dispatch share is an estimate.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
import torchvision

import fxforge
from fxforge.numerics import timing


def measure(name: str, calls: int = 200) -> str:
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = fxforge.compile(model, "x86", example_inputs=x, calibration=[torch.randn(4, 3, 32, 32)])
    graph = compiled.graph_module.graph
    n_calls = sum(n.op in ("call_function", "call_method", "call_module") for n in graph.nodes)
    with torch.inference_mode():
        # 20 warm-up calls, then one block of ``calls`` back-to-back calls
        schedule = timing.Schedule(warmup=20, rounds=1, calls=calls)
        per_call = timing.seconds_per_call(functools.partial(compiled, x), schedule) * 1e3
        with torch.profiler.profile() as prof:
            for _ in range(20):
                compiled(x)
    ops = sum(e.self_cpu_time_total for e in prof.key_averages()) / 20 / 1e3
    return (f"{name}: {len(graph.nodes)} nodes, {n_calls} calls; 1x3x32x32 per call {per_call:.2f} ms, "
            f"of which ops {ops:.2f} ms ({(per_call - ops) / n_calls * 1e3:.0f} us per call outside the ops)")


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for name in sys.argv[1:] or ["resnet18", "mobilenet_v2"]:
        print(measure(name))


if __name__ == "__main__":
    main()

"""Where an int8 model's time goes: torch.ao FX x86 against fxforge's int8 target, op by op, in one process.

Builds both peers as ``bench_int8.py`` does (same model, calibration and input), then profiles a few forward
passes of each with ``torch.profiler`` and prints one table: per op, the self CPU time per forward (ms) and
the calls per forward of each peer, largest difference first. That is how the squeeze-excitation slowdown of
mobilenet_v3 / efficientnet was found: ``quantized::mul`` 3x slower per call than torch.ao's and an
``aten::clone`` per SE block (the mul's NCHW output copied back to channels-last by the next conv).

Run (one thread, batch 1, as the bs1 table): ``.venv/bin/python benchmarks/int8_profile.py mobilenet_v3_large``
(``--target fbgemm``, ``--forwards N``, ``--calibration-batches N``). Other jobs on the cores inflate both
columns; compare them with each other, not across runs.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable

import torch
from bench_int8 import ao_builder, fx_builder, make_calibration, make_model


def op_times(run: Callable[[torch.Tensor], object], x: torch.Tensor, forwards: int) -> dict[str, tuple[float, float]]:
    """op name -> (self CPU ms per forward, calls per forward)."""
    with torch.inference_mode():
        for _ in range(5):
            run(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                run(x)
    return {e.key: (e.self_cpu_time_total / forwards / 1e3, e.count / forwards) for e in prof.key_averages()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="torchvision model name, e.g. mobilenet_v3_large")
    p.add_argument("--target", default="x86", help="fxforge int8 target (x86, fbgemm, qnnpack)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--forwards", type=int, default=10, help="profiled forward passes per peer")
    p.add_argument("--calibration-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224, help="input height and width (smoke runs: 32)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = make_model(args.model)
    size = args.image_size
    calibration = make_calibration(args.calibration_batches, size)
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(args.batch_size))
    peers = {"ao_x86": ao_builder("x86"), f"fx_{args.target}": fx_builder(args.target)}
    times = {}
    for name, builder in peers.items():
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            run = builder(copy.deepcopy(base), x, calibration)
        times[name] = op_times(run, x, args.forwards)
    (a, ta), (b, tb) = times.items()
    ops = sorted(set(ta) | set(tb), key=lambda op: -abs(ta.get(op, (0, 0))[0] - tb.get(op, (0, 0))[0]))
    print(f"{args.model}, batch {args.batch_size}, {args.threads} thread(s): self CPU ms per forward (calls)")
    print(f"| op | {a} | {b} | {b} - {a} |\n|---|---:|---:|---:|")
    for op in ops[:args.rows]:
        (ms_a, n_a), (ms_b, n_b) = ta.get(op, (0.0, 0)), tb.get(op, (0.0, 0))
        print(f"| {op} | {ms_a:.2f} ({n_a:g}) | {ms_b:.2f} ({n_b:g}) | {ms_b - ms_a:+.2f} |")
    total_a, total_b = (sum(ms for ms, _ in t.values()) for t in (ta, tb))
    print(f"| all ops | {total_a:.2f} | {total_b:.2f} | {total_b - total_a:+.2f} |")
    return times


if __name__ == "__main__":
    main()

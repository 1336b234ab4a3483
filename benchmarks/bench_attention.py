"""What attention-to-sdpa buys: eager against fxforge "cpu" with and without the pass, interleaved in one process.

    .venv/bin/python benchmarks/bench_attention.py                      # vit_b_16, batch 1
    .venv/bin/python benchmarks/bench_attention.py --rounds 30 --batch-size 4 --threads 1

Each round calls every variant once, in an order that rotates from round to round, so that load from other
processes falls on all variants alike; the medians over the rounds and their ratios are printed. (bench_cpu.py
times peers one after another because onnxruntime's spinning threads slow the next peer; no such peer here.)
The model is bench_cpu's: random init, BatchNorm re-estimated (vit_b_16 has none), no weights downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_cpu import make_model, rel_error

import fxforge

PASS = "attention-to-sdpa"


def without_pass(pipeline: str, name: str) -> str:
    specs = fxforge.parse_pipeline(pipeline)
    return fxforge.format_pipeline([s for s in specs if s.name != name])


def interleaved_ms(variants: dict, x: torch.Tensor, rounds: int, warmup: int) -> dict[str, float]:
    """Median ms per variant over ``rounds`` rounds of one call each (order rotated per round)."""
    names, times = list(variants), {name: [] for name in variants}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                variants[name](x)
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b_16")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args.model)
    x = torch.randn(args.batch_size, 3, 224, 224)
    pipeline = fxforge.pipeline_for("cpu")
    variants = {"eager": model,
                "fxforge cpu": fxforge.compile(model, "cpu", example_inputs=x),
                f"fxforge cpu without {PASS}": fxforge.compile(model, "cpu", example_inputs=x,
                                                               pipeline=without_pass(pipeline, PASS))}
    with torch.inference_mode():
        ref = model(x)
        for name, run in variants.items():
            print(f"{name}: max rel error vs eager {rel_error(run(x), ref):.1e}")
    ms = interleaved_ms(variants, x, args.rounds, args.warmup)
    print(f"{args.model} bs{args.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds} "
          f"interleaved rounds:")
    for name, value in ms.items():
        print(f"  {name:<40}{value:9.2f} ms   eager / this = {ms['eager'] / value:.2f}x")
    with_pass, without = ms["fxforge cpu"], ms[f"fxforge cpu without {PASS}"]
    print(f"  {PASS} speed-up within fxforge: {without / with_pass:.2f}x (without / with)")


if __name__ == "__main__":
    main()

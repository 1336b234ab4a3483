"""What attention-to-sdpa buys: eager against fxforge "cpu" with and without the pass, interleaved in one process.

    .venv/bin/python benchmarks/bench_attention.py                      # vit_b_16, batch 1
    .venv/bin/python benchmarks/bench_attention.py --rounds 30 --batch-size 4 --threads 1

Each round calls every variant once (``fxforge.numerics.timing``: the order reverses from round to round), so
that load from other processes falls on all variants alike; the medians over the rounds and their ratios are
printed. (bench_cpu.py times peers one after another because onnxruntime's spinning threads slow the next peer;
no such peer here.)
The model is bench_cpu's: random init, BatchNorm re-estimated (vit_b_16 has none), no weights downloaded.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from bench_cpu import make_model, rel_error

import fxforge
from fxforge.numerics import timing
from fxforge.pipeline.fragments import without

PASS = "attention-to-sdpa"


def interleaved_ms(variants: dict, x: torch.Tensor, rounds: int, warmup: int) -> dict[str, float]:
    """Median ms per variant over ``rounds`` interleaved rounds of one call each, after ``warmup`` calls each."""
    calls = {name: functools.partial(run, x) for name, run in variants.items()}
    schedule = timing.Schedule(warmup=warmup, rounds=rounds, statistic=statistics.median)
    with torch.inference_mode():
        return {name: seconds * 1e3 for name, seconds in timing.measure(calls, schedule).items()}


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
                                                               pipeline=without(pipeline, PASS))}
    with torch.inference_mode():
        ref = model(x)
        for name, run in variants.items():
            print(f"{name}: max rel error vs eager {rel_error(run(x), ref):.1e}")
    ms = interleaved_ms(variants, x, args.rounds, args.warmup)
    print(f"{args.model} bs{args.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds} "
          f"interleaved rounds:")
    for name, value in ms.items():
        print(f"  {name:<40}{value:9.2f} ms   eager / this = {ms['eager'] / value:.2f}x")
    with_pass, without_pass = ms["fxforge cpu"], ms[f"fxforge cpu without {PASS}"]
    print(f"  {PASS} speed-up within fxforge: {without_pass / with_pass:.2f}x (without / with)")


if __name__ == "__main__":
    main()

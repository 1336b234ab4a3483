"""fxforge "cpu" with and without lower-cpu's per-layer kernel choice (``autotune``), in one process, interleaved.

For each model and thread count: both variants are compiled (the tuned one at that thread count), checked
against eager fp32, then timed alternately (one call of each per round, ``--rounds`` rounds after a warm-up);
the table gives the median latencies and their ratio (fixed / tuned: >1 means the choice made it faster), and the
ratio of the fastest calls. A model where no layer switched (resnet18 at batch 1) runs the same kernels in both:
its ratio is the noise floor of the run.
    .venv/bin/python benchmarks/fp32_autotune.py --models mobilenet_v2,efficientnet_b0 --threads 1,2
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from bench_cpu import make_model  # random-init torchvision model, BN re-estimated, vit's zero head randomized

import fxforge
from fxforge.numerics import timing
from fxforge.pipeline.fragments import with_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,vit_b_16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    fixed_pipeline = fxforge.pipeline_for("cpu")
    tuned_pipeline = with_options(fixed_pipeline, "lower-cpu", autotune=True)
    print("| model | threads | fixed ms | tuned ms | fixed/tuned | fastest calls | rel err | switched |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            model = make_model(name)
            x = torch.randn(args.batch_size, 3, 224, 224)
            fixed = fxforge.compile(model, "cpu", example_inputs=x, pipeline=fixed_pipeline)
            tuned = fxforge.compile(model, "cpu", example_inputs=x, pipeline=tuned_pipeline)
            notes = next(p.notes for p in tuned.report.passes if p.name == "lower-cpu")
            switched = sum(1 for n in notes if n.startswith("  "))
            with torch.inference_mode():
                ref = model(x)
                err = ((tuned(x) - ref).abs().max() / ref.abs().max()).item()
                # which goes first alternates: no order bias
                calls = {"fixed": functools.partial(fixed, x), "tuned": functools.partial(tuned, x)}
                times = timing.samples(calls, timing.Schedule(warmup=3, rounds=args.rounds))
            f, t = (statistics.median(times[k]) * 1e3 for k in ("fixed", "tuned"))
            best = min(times["fixed"]) / min(times["tuned"])
            print(f"| {name} | {threads} | {f:.2f} | {t:.2f} | {f / t:.3f} | {best:.3f} | {err:.1e} | {switched} |",
                  flush=True)


if __name__ == "__main__":
    main()

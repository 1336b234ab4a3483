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
import statistics
import time

import torch
from bench_cpu import make_model  # random-init torchvision model, BN re-estimated, vit's zero head randomized

import fxforge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,vit_b_16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    fixed_pipeline = fxforge.pipeline_for("cpu")
    tuned_pipeline = fixed_pipeline.replace("lower-cpu", "lower-cpu{autotune=true}")
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
                times = {"fixed": [], "tuned": []}
                for _ in range(3):
                    fixed(x), tuned(x)
                for i in range(args.rounds):  # which goes first alternates: no order bias
                    for key, fn in (("fixed", fixed), ("tuned", tuned))[::1 if i % 2 else -1]:
                        start = time.perf_counter()
                        fn(x)
                        times[key].append(time.perf_counter() - start)
            f, t = (statistics.median(times[k]) * 1e3 for k in ("fixed", "tuned"))
            best = min(times["fixed"]) / min(times["tuned"])
            print(f"| {name} | {threads} | {f:.2f} | {t:.2f} | {f / t:.3f} | {best:.3f} | {err:.1e} | {switched} |",
                  flush=True)


if __name__ == "__main__":
    main()

"""GPU latency: eager fp32 vs fxforge "cuda" (and eager fp16 channels-last for context), in one process.

Run on a machine with a CUDA GPU: ``python benchmarks/bench_cuda.py [--models resnet50,mobilenet_v2]``.
Median of CUDA-event timings per batch; prints a markdown table and the max relative error vs eager fp32.
Random-init torchvision models with BatchNorm statistics re-estimated (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

import fxforge
from fxforge.numerics import max_errors
from fxforge.testing import reestimate_bn


@torch.inference_mode()
def median_ms(fn, x: torch.Tensor, repeats: int = 50) -> float:
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_model(name: str, batch: int) -> dict[str, object]:
    batches = [torch.randn(16, 3, 224, 224, device="cuda") for _ in range(2)]
    model = reestimate_bn(getattr(torchvision.models, name)().cuda(), batches)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    start = time.perf_counter()
    compiled = fxforge.compile(model, "cuda", example_inputs=x)
    compile_s = time.perf_counter() - start
    half = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
    xh = x.half().contiguous(memory_format=torch.channels_last)
    torch.backends.cudnn.allow_tf32 = False  # error measured fp32 vs fp32; timings below use torch's defaults
    with torch.inference_mode():
        err = max_errors(compiled(x), model(x))[1]
    torch.backends.cudnn.allow_tf32 = True
    return {
        "model": name, "bs": batch,
        "eager fp32": median_ms(model, x),
        "fxforge cuda": median_ms(compiled, x),
        "eager fp16 cl": median_ms(half, xh),
        "compile s": compile_s, "rel err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--batch-sizes", default="1,64")
    args = parser.parse_args()
    rows = [bench_model(m, int(b)) for m in args.models.split(",") for b in args.batch_sizes.split(",")]
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  (ms per batch, median)")
    print("| model | bs | eager fp32 | fxforge cuda | eager fp16 cl | compile s | rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bs']} | {r['eager fp32']:.3f} | {r['fxforge cuda']:.3f} | "
              f"{r['eager fp16 cl']:.3f} | {r['compile s']:.2f} | {r['rel err']:.2g} |")


if __name__ == "__main__":
    main()

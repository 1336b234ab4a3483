"""The "cpu" pipeline with and without ``to-nhwc``, in one process, interleaved (blocks of calls alternate).

Without it, lower-cpu's own layout handling runs (each oneDNN conv converts its input, contiguous copies
before views and outputs); with it, the conversions are explicit nodes placed by to-nhwc and lower-cpu adds
none. Prints per model the median and minimum ms of each and the ratios with/without (< 1: to-nhwc faster).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nhwc_ab.py --models resnet18 mobilenet_v2 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import fxforge
from fxforge.testing.helpers import reestimate_bn


def _pipelines() -> dict[str, str]:
    with_nhwc = fxforge.pipeline_for("cpu")
    return {"without": with_nhwc.replace("to-nhwc,", ""), "with": with_nhwc}


def _block_ms(run, x: torch.Tensor, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench(name: str, batch: int, rounds: int, calls: int) -> None:
    torch.manual_seed(0)
    model = reestimate_bn(torchvision.models.get_model(name, weights=None), [torch.randn(4, 3, 224, 224)])
    x = torch.randn(batch, 3, 224, 224)
    runs = {k: fxforge.compile(model, "cpu", example_inputs=x, pipeline=p) for k, p in _pipelines().items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up
        _block_ms(run, x, 3)
    for _ in range(rounds):
        for k, run in runs.items():
            times[k].extend(_block_ms(run, x, calls))
    for stat in (statistics.median, min):
        ms = {k: stat(v) for k, v in times.items()}
        print(f"{name} bs{batch} {stat.__name__}: without {ms['without']:.2f} ms, with {ms['with']:.2f} ms, "
              f"ratio with/without {ms['with'] / ms['without']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with torch.inference_mode():
        for name in args.models:
            bench(name, args.batch, args.rounds, args.calls)


if __name__ == "__main__":
    main()

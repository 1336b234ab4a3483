"""Compile time of torchvision resnet18 on the "cpu" target: total and the passes' share (median and min of N runs).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_time.py [runs]`` (default 7). The total includes
tracing and the model runs compile makes (shape propagation, the final check); "passes" is the sum of the
per-pass times in the report, where pass-API overheads would show.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

import torch
import torchvision

import fxforge


def main(runs: int = 7) -> None:
    torch.set_num_threads(1)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    fxforge.compile(model, "cpu", example_inputs=x)  # warm-up: imports, oneDNN first-call setup
    totals, per_pass = [], defaultdict(list)
    for _ in range(runs):
        report = fxforge.compile(model, "cpu", example_inputs=x).report
        totals.append(report.compile_seconds * 1e3)
        for p in report.passes:
            per_pass[p.name].append(p.seconds * 1e3)
    print(f"resnet18 cpu compile, {runs} runs: total median {statistics.median(totals):.1f} ms, min {min(totals):.1f}")
    for name, ms in per_pass.items():
        print(f"  {name:<20} median {statistics.median(ms):7.2f} ms  min {min(ms):7.2f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)

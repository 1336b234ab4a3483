"""`make demo`: compile a torchvision ResNet-18 for the best target here and show what it gained.

Random-init weights (nothing is downloaded); BatchNorm statistics are re-estimated on random batches so
the outputs are a meaningful numeric reference. Prints eager vs compiled latency at batch 1 and where the
compile report went: report.txt, report.json and report.html (one page with the pass timeline and the graph
after each pass; open it in a browser).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

import fxforge
from fxforge.testing import reestimate_bn


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


@torch.inference_mode()
def median_ms(fn, x: torch.Tensor, repeats: int, label: str) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in tqdm(range(repeats), desc=f"timing {label}", leave=False):
        _sync(x)
        start = time.perf_counter()
        fn(x)
        _sync(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    model = reestimate_bn(torchvision.models.resnet18(), [torch.randn(8, 3, 224, 224) for _ in range(2)])
    x = torch.randn(1, 3, 224, 224)
    print(f"targets usable here: {', '.join(fxforge.targets())}")
    compiled = fxforge.compile(model, "auto", example_inputs=x)
    device = "cuda" if compiled.target.startswith("cuda") else "cpu"
    model, x = model.to(device), x.to(device)  # eager runs where the compiled model runs
    eager = median_ms(model, x, 30, "eager")
    fast = median_ms(compiled, x, 30, "fxforge")
    with torch.inference_mode():
        err = fxforge.numerics.max_errors(compiled(x), model(x))[1]
    report_dir = compiled.report.save(Path("fxforge-report"))
    page = compiled.report.to_html(report_dir / "report.html")
    print(compiled.report)
    print(f"\nresnet18, batch 1, target '{compiled.target}': eager {eager:.2f} ms -> fxforge {fast:.2f} ms "
          f"({eager / fast:.2f}x faster), max relative error {err:.2g}")
    print(f"report written to {report_dir.resolve()}/report.txt (and report.json)")
    print(f"open {page.resolve()} in a browser: the passes, their timings and the graph after each one")


if __name__ == "__main__":
    main()

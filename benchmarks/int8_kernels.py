"""Time one int8 conv kernel per engine on layer shapes from resnet18 and mobilenet_v2 (batch 1).

Shows why lower-x86 chooses the weight packing per layer (backends/int8_kernel_choice.py): no engine is fastest on
every shape, and each kernel call has a fixed cost (tens of microseconds) whatever its size.

    .venv/bin/python benchmarks/int8_kernels.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fxforge.numerics import timing

# (label, channels in, channels out, feature map, kernel, stride, groups)
LAYERS = [
    ("resnet18 layer1 3x3", 64, 64, 56, 3, 1, 1),
    ("resnet18 layer4 3x3", 512, 512, 7, 3, 1, 1),
    ("mbv2 dw 112", 32, 32, 112, 3, 1, 32),
    ("mbv2 dw 112 s2", 96, 96, 112, 3, 2, 96),
    ("mbv2 dw 56", 144, 144, 56, 3, 1, 144),
    ("mbv2 dw 28", 192, 192, 28, 3, 1, 192),
    ("mbv2 dw 14", 576, 576, 14, 3, 1, 576),
    ("mbv2 1x1 expand 28", 32, 192, 28, 1, 1, 1),
    ("1x1 tiny 4x4", 8, 8, 4, 1, 1, 1),
]
ENGINES = [e for e in ("fbgemm", "onednn", "qnnpack") if e in torch.backends.quantized.supported_engines]


def microseconds(fn, calls: int = 31) -> float:
    """Median µs per call of ``fn`` over ``calls`` calls after 3 warm-up calls."""
    return timing.seconds_per_call(fn, timing.Schedule(warmup=3, rounds=calls, statistic=statistics.median)) * 1e6


def time_layer(engine: str, c_in: int, c_out: int, size: int, k: int, stride: int, groups: int) -> float:
    torch.backends.quantized.engine = engine
    g = torch.Generator().manual_seed(0)
    x = torch.quantize_per_tensor(torch.rand(1, c_in, size, size, generator=g), 0.02, 0, torch.quint8)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g)
    scales = w.abs().amax(dim=(1, 2, 3)) / 127
    if engine == "qnnpack":  # per-tensor weights there
        qw = torch.quantize_per_tensor(w, float(scales.max()), 0, torch.qint8)
    else:
        qw = torch.quantize_per_channel(w, scales, torch.zeros(c_out, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.conv2d_prepack(qw, torch.zeros(c_out), [stride] * 2, [k // 2] * 2, [1, 1], groups)
    with torch.inference_mode():
        return microseconds(lambda: torch.ops.quantized.conv2d(x, packed, 0.05, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); median µs per quantized.conv2d call")
    print("| layer | " + " | ".join(ENGINES) + " | fastest |")
    print("|---|" + "---:|" * len(ENGINES) + "---|")
    for label, *shape in LAYERS:
        times = {e: time_layer(e, *shape) for e in ENGINES}
        cells = " | ".join(f"{times[e]:.0f}" for e in ENGINES)
        print(f"| {label} | {cells} | {min(times, key=times.get)} |")


if __name__ == "__main__":
    main()

"""Output SQNR and compile time with and without the per-layer observer search (``search-observers``).

For each model (torchvision, random init, BatchNorm statistics re-estimated on random batches so that the fp32
output is a usable reference) and each quant_config (the default: histogram observer + per-channel weights;
``minmax-pt``: minmax observer + per-tensor weights), compiles twice for ``--target``, interleaved in one
process: plain, and with ``extra_passes={"after:calibrate": "search-observers"}``. Reports the output SQNR
against fp32 on held-out random batches (not the calibration data), the layers the search changed, and the
compile times (the search pass's own time from the report).

Run it:
    .venv/bin/python benchmarks/observer_search.py
    .venv/bin/python benchmarks/observer_search.py --models resnet18 --image-size 96 --calibration 4
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

import fxforge
from fxforge.quant.sqnr import outputs_sqnr_db
from fxforge.testing.helpers import reestimate_bn

CONFIGS = {"default": None, "minmax-pt": fxforge.QuantConfig(activation="minmax", per_channel=False)}


def model_for(name: str, batches: list[torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    return reestimate_bn(getattr(torchvision.models, name)(weights=None), batches)


def run(name: str, target: str, size: int, batch: int, calibration: int) -> None:
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, 3, size, size, generator=g) for _ in range(calibration + 6)]
    bn, cal, held_out = data[:4], data[4:4 + calibration], torch.cat(data[4 + calibration:])
    model = model_for(name, bn)
    with torch.no_grad():
        expected = model(held_out)
    for config_name, config in CONFIGS.items():
        results = {}
        for searched in (False, True):
            extra = {"after:calibrate": "search-observers"} if searched else None
            start = time.perf_counter()
            compiled = fxforge.compile(model, target, example_inputs=cal[0], calibration=cal, quant_config=config,
                                       extra_passes=extra)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                sqnr = outputs_sqnr_db(expected, compiled(held_out))
            search = next((p for p in compiled.report.passes if p.name == "search-observers"), None)
            results[searched] = (sqnr, seconds, search)
        (plain, t0, _), (found, t1, search) = results[False], results[True]
        print(f"{name:<14}{config_name:<11}plain {plain:6.2f} dB  searched {found:6.2f} dB  ({found - plain:+.2f})  "
              f"compile {t0:6.1f} s -> {t1:6.1f} s (search pass {search.seconds:5.1f} s)  {search.notes[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--target", default="x86")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, target {args.target}, {args.calibration} calibration batches of "
          f"{args.batch_size}x3x{args.image_size}x{args.image_size}; SQNR on 6 held-out batches")
    for name in args.models:
        run(name, args.target, args.image_size, args.batch_size, args.calibration)


if __name__ == "__main__":
    main()

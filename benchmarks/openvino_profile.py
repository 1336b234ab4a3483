"""fxforge's int8 ONNX export against NNCF's quantization of the same model, layer by layer on OpenVINO's CPU plugin.

Per model, two OpenVINO models are built as ``bench_onnx_qdq.py`` builds them (same model, calibration images
and input): ``fx_x86`` (``fxforge.compile(model, "x86", ...)`` written by ``export_onnx``, its batch fixed to
the input's as NNCF's model has it) and ``nncf`` (``nncf.quantize`` with NNCF's defaults, bench_int8's peer).
Each is compiled with bench_cpu's settings, and once more with ``PERF_COUNT``. Printed per model:
- *timing*: median wall time and process CPU time per call, the engines interleaved in blocks (``--rounds``
  blocks of ``--block`` calls each), plus the exported file as written (``fx_x86 dynamic batch``, its batch
  dimension left dynamic). CPU time is the steadier number on a shared machine;
- *by kind*: the executed layers per (layer type, kernel), with count and summed real time per call
  (``get_profiling_info``; per layer the fastest of ``--forwards`` calls, which other jobs on the cores
  inflate least): int8 kernels say ``I8`` / ``i8``, float ones ``f32``;
- *compute layers*: convolutions and fully connected layers matched in execution order, those whose kernel or
  output precision differs between the engines, with the ops OpenVINO fused into each, by the names they have
  in the source model less path and numbering (the ONNX file's: QuantizeLinear, fake_quantize for fxforge's
  dequantize, add, silu; NNCF's: fq_output for a FakeQuantize, Swish, Add; Multiply / Subtract for the
  dequantization OpenVINO's low-precision passes move around);
- *between compute layers*: where the layers that run between two matched compute layers differ (the
  runtime graph, ``compiled.get_runtime_model()``): extra Reorder / FakeQuantize / Convert / Eltwise nodes,
  fp32 islands around squeeze-excitation blocks, hardswish or the classifier.
Profilers slow what they time: read the per-layer columns against each other, and the timing table for speed.

Run (batch 1, one thread: the steadier comparison on a loaded machine):
    .venv/bin/python benchmarks/openvino_profile.py mobilenet_v3_large
    .venv/bin/python benchmarks/openvino_profile.py resnet18,efficientnet_b0 --threads 2 --image-size 128
Needs ``openvino`` and ``nncf`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_cpu import make_model, openvino_compiled
from bench_int8 import Calibration, make_calibration, openvino_int8_model
from bench_onnx_qdq import exported

COMPUTE = ("Convolution", "GroupConvolution", "FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul",
           "Deconvolution")
ENGINES = ("fx_x86", "nncf")
DYNAMIC = "fx_x86 dynamic batch"


@dataclass(frozen=True)
class Layer:
    """One executed layer of a compiled OpenVINO model."""

    name: str
    type: str  # the plugin's node type (Convolution, GroupConvolution, Reorder, ...)
    kernel: str  # its exec type: jit_avx512_I8, brgconv_avx512_1x1_I8, ref_any_f32, ...
    out: str  # output precision
    shape: str
    fused: tuple[str, ...]  # the source model's ops OpenVINO merged into it (``op_name``)
    us: float  # fastest real time of the profiled calls

    @property
    def compute(self) -> bool:
        return self.type in COMPUTE

    @property
    def label(self) -> str:
        """Type, kernel, output precision and the fused op kinds (repeats collapsed)."""
        kinds = [k for i, k in enumerate(self.fused) if i == 0 or k != self.fused[i - 1]]
        return f"{self.type}[{self.kernel}]->{self.out}" + (f" ({'+'.join(kinds)})" if kinds else "")


@dataclass
class Profile:
    """One engine: its executed layers (none for a timing-only engine) and its interleaved timings."""

    engine: str
    layers: list[Layer]
    wall_ms: float = float("nan")
    cpu_ms: float = float("nan")


def _rt(op: object, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def op_name(layer: str) -> str:
    """A source layer's name without its path, exporter prefix and numbering: ``node_silu_3`` -> ``silu``,
    ``__module.features.0.2/aten::silu_/Swish`` -> ``Swish``, ``x/fq_output_0`` -> ``fq_output``."""
    return re.sub(r"(_\d+)+$", "", layer.rsplit("/", 1)[-1].removeprefix("node_"))


def layers(ov_model: object, x: torch.Tensor, forwards: int) -> list[Layer]:
    """The executed layers of ``ov_model`` compiled with PERF_COUNT, in execution order, fastest times."""
    compiled = openvino_compiled(ov_model, perf_counters=True)
    request = compiled.create_infer_request()
    times: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    for i in range(forwards + 3):  # three warm-up calls
        request.infer({0: x.numpy()})
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED and i >= 3:
                times[info.node_name].append(info.real_time.total_seconds() * 1e6)
                kinds[info.node_name] = (info.node_type, info.exec_type)
    ops = {op.get_friendly_name(): op for op in compiled.get_runtime_model().get_ordered_ops()}
    out = []
    for name, op in ops.items():
        if name not in times:
            continue
        fused = tuple(op_name(n) for n in _rt(op, "originalLayersNames").split(",") if n)
        out.append(Layer(name, *kinds[name], _rt(op, "outputPrecisions"), str(op.get_output_partial_shape(0)),
                         fused, min(times[name])))
    return out


def interleaved(runners: dict[str, Callable[[], object]], rounds: int, block: int) -> dict[str, tuple[float, float]]:
    """engine -> (median wall ms per call, median process CPU ms per call), the engines run in turn."""
    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for run in runners.values():
        for _ in range(block):
            run()
    for _ in range(rounds):
        for name, run in runners.items():
            c0 = time.process_time()
            for _ in range(block):
                t0 = time.perf_counter()
                run()
                wall[name].append(time.perf_counter() - t0)
            cpu[name].append((time.process_time() - c0) / block)
    return {n: (statistics.median(wall[n]) * 1e3, statistics.median(cpu[n]) * 1e3) for n in runners}


def ov_models(model: torch.nn.Module, x: torch.Tensor, calibration: Calibration) -> dict[str, object]:
    """engine -> OpenVINO model: fxforge's export with its batch fixed to ``x``'s and as written, and NNCF's."""
    import openvino as ov

    onnx_bytes = exported("x86", copy.deepcopy(model), x, calibration)
    static, dynamic = (ov.Core().read_model(onnx_bytes, b"") for _ in range(2))
    static.reshape(list(x.shape))
    return {"fx_x86": static, "nncf": openvino_int8_model(copy.deepcopy(model), x, calibration), DYNAMIC: dynamic}


def profiles(models: dict[str, object], x: torch.Tensor, forwards: int, rounds: int, block: int) -> dict[str, Profile]:
    """Per engine: its executed layers (the engines of ``ENGINES``) and interleaved timings (all of them)."""
    requests = {name: openvino_compiled(m).create_infer_request() for name, m in models.items()}
    inp = {0: x.numpy()}
    timing = interleaved({n: (lambda r=r: r.infer(inp)) for n, r in requests.items()}, rounds, block)
    return {n: Profile(n, layers(models[n], x, forwards) if n in ENGINES else [], *timing[n]) for n in models}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def timing_table(results: dict[str, Profile]) -> list[str]:
    rows = []
    for p in results.values():
        computes = [layer for layer in p.layers if layer.compute]
        fp32 = sum("f32" in layer.kernel.lower() for layer in computes)
        counts = [str(len(p.layers)), f"{len(computes) - fp32} / {fp32}"] if p.layers else ["-", "-"]
        rows.append([p.engine, f"{p.wall_ms:.3f}", f"{p.cpu_ms:.3f}", *counts])
    return _table(["engine", "wall ms", "CPU ms", "executed layers", "compute layers int8 / fp32"], rows)


def kind_table(a: Profile, b: Profile) -> list[str]:
    """Per (type, kernel): count and summed us per call (each layer's fastest) in each engine, largest
    difference first."""
    sums = {p.engine: defaultdict(lambda: [0, 0.0]) for p in (a, b)}
    for p in (a, b):
        for layer in p.layers:
            cell = sums[p.engine][(layer.type, layer.kernel)]
            cell[0] += 1
            cell[1] += layer.us
    keys = sorted(set(sums[a.engine]) | set(sums[b.engine]),
                  key=lambda k: -abs(sums[a.engine].get(k, [0, 0.0])[1] - sums[b.engine].get(k, [0, 0.0])[1]))

    def cell(engine: str, key: tuple[str, str]) -> str:
        n, us = sums[engine].get(key, [0, 0.0])
        return f"{n} / {us:.0f}" if n else "-"

    rows = [[f"{t} [{k}]", cell(a.engine, (t, k)), cell(b.engine, (t, k))] for t, k in keys]
    total = [f"**all** ({len(a.layers)} / {len(b.layers)} layers)", f"{sum(x.us for x in a.layers):.0f} us",
             f"{sum(x.us for x in b.layers):.0f} us"]
    return _table(["layer [kernel]", f"{a.engine}: n / us", f"{b.engine}: n / us"], [*rows, total])


def _segments(p: Profile) -> tuple[list[Layer], list[list[Layer]]]:
    """The compute layers, and the other layers before each compute layer (one more list: after the last)."""
    computes, between, current = [], [], []
    for layer in p.layers:
        if layer.compute:
            computes.append(layer)
            between.append(current)
            current = []
        else:
            current.append(layer)
    return computes, [*between, current]


def _ops(layers_: list[Layer]) -> str:
    return ", ".join(x.label for x in layers_) or "-"


def diff_tables(a: Profile, b: Profile) -> list[str]:
    """Compute layers whose kernel or output differs, and the stretches between them that differ."""
    (ca, ba), (cb, bb) = _segments(a), _segments(b)
    if [x.shape for x in ca] != [x.shape for x in cb]:
        return [f"compute layers do not match in order ({len(ca)} against {len(cb)}): see the kind table"]
    rows = [[str(i), x.shape, x.label, y.label, f"{x.us:.0f} / {y.us:.0f}"]
            for i, (x, y) in enumerate(zip(ca, cb, strict=True))
            if (x.type, x.kernel, x.out) != (y.type, y.kernel, y.out)]
    out = [f"Compute layers that differ ({len(rows)} of {len(ca)}):", ""]
    out += _table(["#", "output", a.engine, b.engine, "us"], rows) if rows else ["(none)"]
    gaps = [[f"before #{i}" if i < len(ca) else "after the last", _ops(x), _ops(y),
             f"{sum(v.us for v in x):.0f} / {sum(v.us for v in y):.0f}"]
            for i, (x, y) in enumerate(zip(ba, bb, strict=True))
            if Counter(v.type for v in x) != Counter(v.type for v in y)]
    out += ["", f"Layers between compute layers that differ ({len(gaps)} stretches):", ""]
    out += _table(["where", a.engine, b.engine, "us"], gaps) if gaps else ["(none)"]
    return out


def render(model: str, results: dict[str, Profile]) -> str:
    a, b = (results[e] for e in ENGINES)
    parts = [f"## {model}", "", *timing_table(results), "", "Executed layers by kind (count / summed us per call, "
             "PERF_COUNT, each layer's fastest call):", "", *kind_table(a, b), "", *diff_tables(a, b), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Profile]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", help="comma-separated torchvision model names, e.g. mobilenet_v3_large")
    p.add_argument("--threads", type=int, default=1, help="OpenVINO's INFERENCE_NUM_THREADS (torch's threads)")
    p.add_argument("--forwards", type=int, default=30, help="profiled calls per engine")
    p.add_argument("--rounds", type=int, default=20, help="timing rounds (each engine runs --block calls)")
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibration = make_calibration(args.calibration_batches, args.image_size)
    x = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    out = {}
    for name in args.models.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = ov_models(make_model(name), x, calibration)
        out[name] = profiles(models, x, args.forwards, args.rounds, args.block)
        print(render(name, out[name]), flush=True)
    return out


if __name__ == "__main__":
    main()

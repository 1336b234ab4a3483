"""``compile(..., profitability=True)``: int8 only where it is faster, measured on this machine.

An int8 kernel is not always faster than fp32 (small layers, CPUs without VNNI, depthwise convs). For each
int8 conv/linear kernel of the compiled static int8 graph:
- int8 time: the kernel on its own int8 input, as the compiled graph runs it;
- fp32 time: what the layer costs when ``skip`` keeps it in fp32 between int8 neighbours: dequantize its
  input, the fp32 layer (original weights, fused activation), quantize its output;
both the median of a few runs on the example inputs. Layers whose int8 time exceeds the fp32 time by more
than ``MARGIN`` are recompiled in fp32 (``skip``); the result is kept only when the whole model, timed the
same way, is faster too: per-layer timings miss effects between layers. ``report.profitability`` lists
every measured layer. Timings are noisy on a busy machine: the margin and the whole-model check guard
against moving layers on noise.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fxforge.capture.signature import call_with, graph_inputs
from fxforge.driver import health
from fxforge.driver.build import build
from fxforge.driver.compiled import CompiledModule
from fxforge.errors import ConfigError
from fxforge.graph.meta import fxmeta
from fxforge.numerics import timing
from fxforge.pipeline.report import LayerTiming, ProfitabilityRecord
from fxforge.progress import bar
from fxforge.quant.deprecation import quantized_tensors_quietly
from fxforge.quant.qspec import quantized_engine

log = logging.getLogger(__name__)
MARGIN = 0.10  # int8 must be at least this much slower before a layer moves to fp32
SCHEDULE = timing.Schedule(warmup=1, rounds=15, statistic=statistics.median)
Timer = Callable[[Callable[[], Any]], float]  # seconds one call takes (median of a few)
_q = torch.ops.quantized
_KERNELS = {_q.conv1d, _q.conv2d, _q.conv3d, _q.conv2d_relu, _q.conv2d_add, _q.conv2d_add_relu, _q.linear,
            _q.linear_relu}


def median_seconds(fn: Callable[[], Any]) -> float:
    with torch.inference_mode():
        return timing.seconds_per_call(fn, SCHEDULE)


def _layer_path(observed: fx.GraphModule, origins: list[str]) -> str | None:
    """The module path of the observed graph's call whose origins start the kernel's origins."""
    for node in observed.graph.nodes:
        own = fxmeta(node).get("origins") or [node.name]
        if node.op == "call_module" and origins[:len(own)] == own:
            return str(node.target)
    return None


class _KernelArgs(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.args: dict[str, tuple] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in _KERNELS:
            self.args[n.name] = self.fetch_args_kwargs_from_env(n)[0]
        return super().run_node(n)


def layer_timings(compiled: CompiledModule, inputs: Any, timer: Timer = median_seconds) -> list[LayerTiming]:
    """int8 kernel vs fp32 island time of every int8 conv/linear of a static int8 compiled model, on example
    ``inputs`` in any form compile accepts."""
    gm, observed = compiled.graph_module, compiled.observed_graph
    interp = _KernelArgs(gm)
    with quantized_engine(compiled.quant_options.runtime_engine), torch.inference_mode(), quantized_tensors_quietly():
        interp.run(*graph_inputs(compiled.signature, inputs))
        timings = []
        kernels = [n for n in gm.graph.nodes if n.name in interp.args]
        for node in (layers := bar(kernels, desc="profitability: timing int8 vs fp32", unit="layer")):
            path = _layer_path(observed, fxmeta(node).get("origins", []))
            if path is None:
                continue
            layers.set_postfix_str(path, refresh=False)
            args, module = interp.args[node.name], observed.get_submodule(path)
            timings.append(LayerTiming(path, str(node.target).split(".")[-1], timer(_call(node.target, args)) * 1e3,
                                       timer(_fp32_island(module, args)) * 1e3))
    return timings


def _call(kernel: Callable, args: tuple) -> Callable[[], Any]:
    return lambda: kernel(*args)


def _fp32_island(module: nn.Module, args: tuple) -> Callable[[], Any]:
    # the kernel's int8 inputs (x, and the residual of conv2d_add) dequantized into the fp32 layer
    inputs, scale, zero_point = [a for a in args if isinstance(a, torch.Tensor) and a.is_quantized], args[-2], args[-1]
    return lambda: torch.quantize_per_tensor(module(*(a.dequantize() for a in inputs)), scale, zero_point,
                                             torch.quint8)


def keep_profitable(model: nn.Module, target: str, compiled: CompiledModule, options: dict[str, Any],
                    timer: Timer | None = None) -> CompiledModule:
    """``compiled`` with the layers that are slower in int8 moved to fp32, when that makes the model faster."""
    if compiled.observed_graph is None:
        raise ConfigError("profitability=True measures static int8 kernels: use an int8 target with "
                          "quantization='static' (and calibration data)")
    inputs, timer = options["example_inputs"], timer or median_seconds
    timings = layer_timings(compiled, inputs, timer)
    slower = [t.layer for t in timings if timing.clearly_faster(t.fp32_ms, t.int8_ms, MARGIN)]
    record = ProfitabilityRecord(timings=timings, model_ms_before=timer(lambda: call_with(compiled, inputs)) * 1e3,
                                 margin=MARGIN)
    result = compiled
    if slower:
        with health.deferred():
            candidate = build(model, target, **{**options, "skip": (*compiled.quant_options.skip, *slower)})
        record.model_ms_after = timer(lambda: call_with(candidate, inputs)) * 1e3
        if record.model_ms_after < record.model_ms_before:
            result, record.fp32_layers = candidate, slower
            health.announce(candidate.report, already=compiled.report.warnings)
        log.info("profitability: %d layer(s) slower in int8; with them in fp32 the model runs %.3f ms (was %.3f): %s",
                 len(slower), record.model_ms_after, record.model_ms_before,
                 "kept" if result is candidate else "not kept")
    for attr in ("accuracy", "comparison"):  # what earlier steps recorded about the model
        setattr(result.report, attr, getattr(result.report, attr) or getattr(compiled.report, attr))
    result.report.profitability = record
    return result

"""quantize-dynamic: int8 weights, activations quantized at run time (or kept fp32 with ``weight_only``).

Rewrites (reference numerics; lowering maps them to dynamic int8 kernels):
    linear(x)   -> linear(dynamic_quantize(x))  with the weight on its per-channel int8 grid (per tensor
                   where the layer's quant_config says per_channel=False, for every layer kind below)
    lstm / gru  -> DynamicQuantLSTM / DynamicQuantGRU (int8 weights; each layer's input sequence quantized
                   once and the hidden state at every step, as torch's dynamic int8 RNN kernels do)
    weight_only: linear and embedding weights on their int8 grid, activations untouched.
``dynamic_quantize`` picks a per-tensor scale from each call's own min/max, so no calibration is needed:
the right mode when activation ranges vary from input to input (NLP, RNNs).
Why correct: the rewritten modules compute the same function with weights rounded to int8 and, in dynamic
mode, inputs rounded per call; the report gives the SQNR of each layer's output against fp32.
Preconditions: quantization options in the context (an int8 target with quantization="dynamic").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import fx, nn

from fxforge.graph.fused import FusedLinear
from fxforge.graph.matching import call_count, module_of, replace_submodule
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.report import QuantLayerRecord, QuantSummary
from fxforge.quant.config import QuantOptions, layer_name
from fxforge.quant.qspec import BackendQuant, QSpec, backend_quant
from fxforge.quant.reference import DynamicQuantGRU, DynamicQuantLSTM, dynamic_quantize, quantize_weight
from fxforge.quant.sqnr import capture, outputs_sqnr_db

from .insert_observers import quant_options

_RNNS = {nn.LSTM: DynamicQuantLSTM, nn.GRU: DynamicQuantGRU}


def _weighted(module: nn.Module | None, weight_only: bool) -> nn.Module | None:
    """The Linear (or, weight-only, Embedding) whose weight gets quantized."""
    if isinstance(module, FusedLinear):
        module = module.linear
    kinds = (nn.Linear, nn.Embedding) if weight_only else (nn.Linear,)
    return module if isinstance(module, kinds) else None


def _weight_spec(opts: QuantOptions, backend: BackendQuant, path: str, layer: nn.Module) -> QSpec:
    """Per output row, or one scale per tensor where the layer's quant_config says per_channel=False."""
    per_channel = opts.config.resolve(path, type(layer), type(layer).__name__.lower()).per_channel
    return backend.dynamic.with_axis(0 if per_channel else None)


def _quantize_weight_of(layer: nn.Module, spec: QSpec) -> str:
    w, scale, zero_point = quantize_weight(layer.weight.detach(), spec)
    layer.weight.data.copy_(w)
    layer.register_buffer("weight_scale", scale)
    layer.register_buffer("weight_zero_point", zero_point)
    return spec.describe()


def _rewrite(gm: fx.GraphModule, node: fx.Node, opts: QuantOptions, backend: BackendQuant,
             weight_only: bool) -> str | None:
    """Quantize one node's layer; returns its weight description, or None when not quantizable."""
    mod = module_of(gm, node)
    if mod is None or call_count(gm, str(node.target)) != 1:
        return None
    if type(mod) in _RNNS and not weight_only:
        spec = _weight_spec(opts, backend, str(node.target), mod)
        replace_submodule(gm, str(node.target), _RNNS[type(mod)].from_float(mod, spec, backend.reduce_range))
        rows = " per gate row" if spec.axis is not None else ""
        return f"{spec.describe()}{rows}; input per layer, hidden state per step"
    layer = _weighted(mod, weight_only)
    if layer is None:
        return None
    if not weight_only:
        with gm.graph.inserting_before(node):
            x = gm.graph.call_function(dynamic_quantize, (node.args[0], backend.reduce_range))
        node.replace_input_with(node.args[0], x)
    return _quantize_weight_of(layer, _weight_spec(opts, backend, str(node.target), layer))


def _records(gm: fx.GraphModule, before: fx.GraphModule, layers: dict[str, str], ctx: PassContext,
             mode: str) -> list[QuantLayerRecord]:
    names = set(layers)
    fp32, got = capture(before, ctx.fresh_inputs(), names), capture(gm, ctx.fresh_inputs(), names)
    records = []
    for node in gm.graph.nodes:
        if node.name in layers:
            sqnr = outputs_sqnr_db(fp32[node.name], got[node.name]) if node.name in got else None
            records.append(QuantLayerRecord(
                layer=layer_name(node), op=type(module_of(gm, node)).__name__, node=node.name,
                observer="none (per call)" if mode == "dynamic" else "none (fp32 activations)",
                scale=0.0, zero_point=0, activation="quint8 per-tensor, per call" if mode == "dynamic" else "fp32",
                weight=layers[node.name], sqnr_db=None if sqnr is None else sqnr if math.isfinite(sqnr) else 999.0))
    return records


@register_pass
@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """Linear/LSTM/GRU -> dynamic int8 (``weight_only``: Linear/Embedding int8 weights only)."""

    name = "quantize-dynamic"
    provides = frozenset({"quantized"})
    weight_only: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = quant_options(ctx, self.name)
        backend = backend_quant(opts.backend, opts.reduce_range)
        ctx.shapes(gm)
        before = copy.deepcopy(gm)
        layers: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and not opts.skipped(str(node.target)):
                described = _rewrite(gm, node, opts, backend, self.weight_only)
                if described is not None:
                    layers[node.name] = described
        gm.recompile()
        mode = "weight-only" if self.weight_only else "dynamic"
        ctx.report.quantization = QuantSummary(mode=mode, backend=backend.name, reduce_range=backend.reduce_range
                                               and not self.weight_only, layers=_records(gm, before, layers, ctx, mode),
                                               skipped=list(opts.skip))
        return PassResult(gm, bool(layers), [f"{len(layers)} layers quantized ({mode})"])

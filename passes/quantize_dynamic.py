"""quantize-dynamic: int8 weights, activations quantized at run time, each layer checked for what it can take.

Rewrites (reference numerics; lowering maps them to dynamic int8 kernels):
    linear(x)   -> linear(dynamic_quantize(x))  with the weight on its per-channel int8 grid (per tensor
                   where the layer's quant_config says per_channel=False, for every layer kind below);
                   SmoothQuant-equalized (x / s, w * s per input channel) or kept fp32 where plain int8 is
                   measured below ``min_layer_sqnr_db``; transformers' Conv1D becomes the equivalent Linear
    lstm / gru  -> DynamicQuantLSTM / DynamicQuantGRU: per layer of the stack, int8 weights with the layer's
                   input sequence quantized once and the hidden state at every step (torch's dynamic int8 RNN
                   kernels), or fp16 weights on fp32 activations for a layer measured below the floor
``dynamic_quantize`` picks a per-tensor scale from each call's own min/max, so no calibration is needed.
Sensitivity: each candidate is run alone (the rest of the layer fp32) on the values the example inputs
produce at that layer, and its output SQNR against fp32 decides; the report gives each layer's choice and dB.
Why correct: equalization divides an input channel and multiplies the weight column that reads it by the
same factor (exact in fp32); the rewritten modules compute the same function with weights and inputs rounded.
Preconditions: quantization options in the context (an int8 target with quantization="dynamic").
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.fused import FusedLinear
from fxforge.graph.matching import call_count, module_of, replace_submodule
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.report import QuantLayerRecord, QuantSummary
from fxforge.quant.config import QuantOptions, layer_name
from fxforge.quant.qspec import BackendQuant, QSpec, backend_quant
from fxforge.quant.reference import DynamicQuantGRU, DynamicQuantLSTM, dynamic_quantize, quantize_weight
from fxforge.quant.sqnr import capture, outputs_sqnr_db, sqnr_db

from .insert_observers import quant_options
from .weight_only import as_linear

log = logging.getLogger(__name__)

_RNNS = {nn.LSTM: DynamicQuantLSTM, nn.GRU: DynamicQuantGRU}
_SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength: half the activation range moves into the weights


def _linear_of(module: nn.Module | None) -> nn.Linear | None:
    """The Linear whose weight gets quantized (a FusedLinear's, or a Conv1D's Linear twin)."""
    if isinstance(module, FusedLinear):
        module = module.linear
    return as_linear(module) if module is not None else None


def _weight_spec(opts: QuantOptions, backend: BackendQuant, path: str, layer: nn.Module) -> QSpec:
    """Per output row, or one scale per tensor where the layer's quant_config says per_channel=False."""
    per_channel = opts.config.resolve(path, type(layer), type(layer).__name__.lower()).per_channel
    return backend.dynamic.with_axis(0 if per_channel else None)


def _quantize_weight_of(layer: nn.Module, spec: QSpec) -> None:
    w, scale, zero_point = quantize_weight(layer.weight.detach(), spec)
    layer.weight.data.copy_(w)
    layer.register_buffer("weight_scale", scale)
    layer.register_buffer("weight_zero_point", zero_point)


def _smoothing(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s = max|x|^a / max|w|^(1-a) (x / s and w * s flatten both)."""
    x_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).clamp(min=1e-5)
    w_max = weight.detach().abs().amax(0).clamp(min=1e-5)
    return (x_max.pow(_SMOOTH_ALPHA) / w_max.pow(1 - _SMOOTH_ALPHA)).clamp(min=1e-5)


def _linear_sqnr(x: torch.Tensor, linear: nn.Linear, spec: QSpec, reduce_range: bool,
                 smooth: torch.Tensor | None) -> float:
    """Output SQNR of the linear with int8 weights on per-call int8 inputs (equalized by ``smooth``)."""
    w = linear.weight.detach() if smooth is None else linear.weight.detach() * smooth
    xs = x if smooth is None else x / smooth
    wq, _, _ = quantize_weight(w, spec)
    return sqnr_db(F.linear(x, linear.weight, linear.bias), F.linear(dynamic_quantize(xs, reduce_range), wq,
                                                                     linear.bias))


@dataclass
class _Choice:
    """What one layer got, and why (the report's weight column)."""

    described: str
    sqnr_db: float


def _choose_linear(x: torch.Tensor, linear: nn.Linear, spec: QSpec, reduce_range: bool,
                   floor: float) -> tuple[str, torch.Tensor | None, float]:
    """("int8" | "int8+smooth" | "fp32", smoothing factors, measured SQNR): the first scheme above ``floor``."""
    plain = _linear_sqnr(x, linear, spec, reduce_range, None)
    if plain >= floor:
        return "int8", None, plain
    smooth = _smoothing(x, linear.weight)
    smoothed = _linear_sqnr(x, linear, spec, reduce_range, smooth)
    if smoothed >= floor:
        return "int8+smooth", smooth, smoothed
    return "fp32", None, max(plain, smoothed)


def _rewrite_linear(gm: fx.GraphModule, node: fx.Node, layer: nn.Linear, x: Any, spec: QSpec,
                    backend: BackendQuant, floor: float) -> _Choice:
    scheme, smooth, measured = ("int8", None, math.inf) if not isinstance(x, torch.Tensor) else \
        _choose_linear(x.float(), layer, spec, backend.reduce_range, floor)
    if scheme == "fp32":
        return _Choice(f"fp32 (int8 {measured:.1f} dB, smoothed too, below {floor:.0f} dB)", measured)
    source = node.args[0]
    with gm.graph.inserting_before(node):
        if smooth is not None:
            inverse = f"{node.target}_smooth_inverse".replace(".", "_")
            gm.register_buffer(inverse, 1.0 / smooth)
            source = gm.graph.call_function(torch.mul, (source, gm.graph.get_attr(inverse)))
            layer.weight.data.mul_(smooth)
        quantized = gm.graph.call_function(dynamic_quantize, (source, backend.reduce_range))
    node.replace_input_with(node.args[0], quantized)
    _quantize_weight_of(layer, spec)
    why = f", int8+smooth (plain int8 below {floor:.0f} dB)" if smooth is not None else ""
    return _Choice(f"{spec.describe()}{why}", measured)


def _rnn_schemes(rnn: nn.RNNBase, args: tuple, spec: QSpec, reduce_range: bool, floor: float
                 ) -> tuple[tuple[str, ...], list[float]]:
    """Per layer of the stack: int8 when the RNN with only that layer int8 (the rest fp16) keeps ``floor``."""
    kind = _RNNS[type(rnn)]
    with torch.no_grad():
        reference = rnn(*args)
        measured = []
        for layer in range(rnn.num_layers):
            schemes = tuple("int8" if i == layer else "fp16" for i in range(rnn.num_layers))
            measured.append(outputs_sqnr_db(reference, kind.from_float(rnn, spec, reduce_range, schemes)(*args)))
    return tuple("int8" if db >= floor else "fp16" for db in measured), measured


def _rewrite_rnn(gm: fx.GraphModule, node: fx.Node, rnn: nn.RNNBase, args: tuple | None, spec: QSpec,
                 backend: BackendQuant, floor: float) -> _Choice:
    layers = rnn.num_layers
    schemes, measured = _rnn_schemes(rnn, args, spec, backend.reduce_range, floor) if args is not None else \
        (("int8",) * layers, [math.inf] * layers)
    replace_submodule(gm, str(node.target), _RNNS[type(rnn)].from_float(rnn, spec, backend.reduce_range, schemes))
    rows = " per gate row" if spec.axis is not None else ""
    per_layer = ", ".join(f"l{i} {s} ({db:.0f} dB)" if math.isfinite(db) else f"l{i} {s}"
                          for i, (s, db) in enumerate(zip(schemes, measured, strict=True)))
    kept = [db for s, db in zip(schemes, measured, strict=True) if s == "int8"]  # the layers the int8 kernels run
    return _Choice(f"{spec.describe()}{rows}; {per_layer}", min(kept, default=math.inf))


def _call_args(node: fx.Node, values: dict[str, Any]) -> tuple | None:
    """The node's positional arguments as the example inputs produced them, or None where one is missing."""
    if any(isinstance(a, fx.Node) and a.name not in values for a in node.args):
        return None
    return tuple(fx.node.map_arg(node.args, lambda a: values[a.name]))


def _quantizable(gm: fx.GraphModule, node: fx.Node, opts: QuantOptions) -> nn.Module | None:
    if node.op != "call_module" or opts.skipped(str(node.target)) or call_count(gm, str(node.target)) != 1:
        return None
    mod = module_of(gm, node)
    return mod if type(mod) in _RNNS or _linear_of(mod) is not None else None


def _records(gm: fx.GraphModule, before: fx.GraphModule, layers: dict[str, _Choice], ctx: PassContext
             ) -> list[QuantLayerRecord]:
    names = set(layers)
    fp32, got = capture(before, ctx.fresh_inputs(), names), capture(gm, ctx.fresh_inputs(), names)
    records = []
    for node in gm.graph.nodes:
        if node.name in layers:
            sqnr = outputs_sqnr_db(fp32[node.name], got[node.name]) if node.name in got else None
            local = layers[node.name].sqnr_db
            records.append(QuantLayerRecord(
                layer=layer_name(node), op=type(module_of(gm, node)).__name__, node=node.name,
                observer="none (per call)", scale=0.0, zero_point=0, activation="quint8 per-tensor, per call",
                weight=layers[node.name].described, local_sqnr_db=local if math.isfinite(local) else None,
                sqnr_db=None if sqnr is None else sqnr if math.isfinite(sqnr) else 999.0))
    return records


@register_pass
@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """Linear/Conv1D/LSTM/GRU -> dynamic int8, each layer (an RNN: each layer of its stack) at the first scheme
    whose measured output SQNR reaches ``min_layer_sqnr_db``."""

    name = "quantize-dynamic"
    provides = frozenset({"quantized"})
    min_layer_sqnr_db: float = 25.0

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = quant_options(ctx, self.name)
        backend = backend_quant(opts.backend, opts.reduce_range)
        ctx.shapes(gm)
        before = copy.deepcopy(gm)
        targets = {n: m for n in list(gm.graph.nodes) if (m := _quantizable(gm, n, opts)) is not None}
        inputs = {a.name for n in targets for a in n.all_input_nodes}
        values = capture(before, ctx.fresh_inputs(), inputs)
        layers = {n.name: self._rewrite(gm, n, m, _call_args(n, values), opts, backend) for n, m in targets.items()}
        gm.recompile()
        ctx.report.quantization = QuantSummary(mode="dynamic", backend=backend.name,
                                               reduce_range=backend.reduce_range,
                                               layers=_records(gm, before, layers, ctx), skipped=list(opts.skip))
        kept = [name for name, c in layers.items() if c.described.startswith("fp32") or "fp16" in c.described]
        notes = [f"{len(layers)} layers quantized (dynamic)"]
        if kept:
            notes.append(f"int8 measured below {self.min_layer_sqnr_db:.0f} dB, kept in higher precision: "
                         + ", ".join(kept))
            log.info("quantize-dynamic: kept in higher precision (int8 below %.0f dB): %s",
                     self.min_layer_sqnr_db, ", ".join(kept))
        return PassResult(gm, bool(layers), notes)

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, mod: nn.Module, args: tuple | None,
                 opts: QuantOptions, backend: BackendQuant) -> _Choice:
        path = str(node.target)
        if type(mod) in _RNNS:
            spec = _weight_spec(opts, backend, path, mod)
            return _rewrite_rnn(gm, node, mod, args, spec, backend, self.min_layer_sqnr_db)
        linear = _linear_of(mod)
        assert linear is not None
        if linear is not mod and not isinstance(mod, FusedLinear):  # Conv1D: its Linear twin takes its place
            replace_submodule(gm, path, linear)
        spec = _weight_spec(opts, backend, path, linear)
        return _rewrite_linear(gm, node, linear, args[0] if args else None, spec, backend, self.min_layer_sqnr_db)

"""quantize-dynamic: int8 weights, activations quantized at run time, each layer checked for what it can take.

Rewrites (reference numerics; lowering maps them to dynamic int8 kernels):
    linear(x)   -> linear(dynamic_quantize(x))  with the weight on its per-channel int8 grid (per tensor
                   where the layer's quant_config says per_channel=False, for every layer kind below);
                   SmoothQuant-equalized (x / s, w * s per input channel) or kept fp32 where plain int8 is
                   measured below ``min_layer_sqnr_db``; transformers' Conv1D becomes the equivalent Linear
    lstm / gru  -> per layer of the stack: int8 weights with the layer's input sequence quantized once and the
                   hidden state at every step (DynamicQuantLSTM / DynamicQuantGRU: torch's dynamic int8 RNN
                   kernels) where int8 holds the floor, else fp32; either replaced by bf16 (oneDNN's bf16 RNN)
                   where bf16 holds the floor and is timed faster (int8 timed as the backend will run it,
                   ``fxforge.quant.runtime``; ``fxforge.numerics.timing``); a stack whose layers differ runs as
                   consecutive parts (their final states joined). A stack called with an initial state
                   cannot be split: its layers below the floor keep fp16 weights on fp32 activations inside the
                   one dynamic module
Sibling linears that read one tensor are then merged into one (``share_dynamic_quantize``: one quantize, one GEMM).
``dynamic_quantize`` picks a per-tensor scale from each call's own min/max, so no calibration is needed.
Sensitivity: each candidate is run alone (the rest of the layer or stack unrounded) on the values the example inputs
produce at that layer, and its output SQNR against fp32 decides; the report gives each layer's choice and dB.
Why correct: equalization divides an input channel and multiplies the weight column that reads it by the
same factor (exact in fp32); a stack is its layers applied in turn, each starting from zero state; the
rewritten modules compute the same function with weights and inputs rounded.
Preconditions: quantization options in the context (an int8 target with quantization="dynamic").
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.fused import FusedLinear
from fxforge.graph.matching import call_count, module_of, replace_submodule
from fxforge.graph.meta import record_rewrite
from fxforge.numerics import timing
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.report import QuantLayerRecord, QuantSummary
from fxforge.quant.config import QuantOptions, layer_name
from fxforge.quant.qspec import BackendQuant, QSpec, backend_quant
from fxforge.quant.reference import DynamicQuantGRU, DynamicQuantLSTM, dynamic_quantize, quantize_weight
from fxforge.quant.runtime import runtime_for
from fxforge.quant.sqnr import capture, outputs_sqnr_db, sqnr_db

from .insert_observers import quant_options
from .share_dynamic_quantize import share_dynamic_quantize
from .weight_only import as_linear

log = logging.getLogger(__name__)

_RNNS = {nn.LSTM: DynamicQuantLSTM, nn.GRU: DynamicQuantGRU}
_RNN_SCHEDULE = timing.Schedule(warmup=1, rounds=3)  # whole RNN parts on the example input: a few calls each
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
    higher_precision: bool = False  # some of the layer kept fp32 / fp16: int8 measured below the floor


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
        return _Choice(f"fp32 (int8 {measured:.1f} dB, smoothed too, below {floor:.0f} dB)", measured, True)
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


def _sub_rnn(rnn: nn.RNNBase, layers: range) -> nn.RNNBase:
    """An RNN of the same kind running ``layers`` of ``rnn`` (their weights copied, renumbered from 0)."""
    first_input = rnn.input_size if layers.start == 0 else rnn.hidden_size * (2 if rnn.bidirectional else 1)
    part = type(rnn)(first_input, rnn.hidden_size, len(layers), rnn.bias, rnn.batch_first, 0.0, rnn.bidirectional)
    with torch.no_grad():
        for name, param in part.named_parameters():
            prefix, layer = name.split("_l")[0], int(name.split("_l")[1].split("_")[0])
            param.copy_(getattr(rnn, name.replace(f"{prefix}_l{layer}", f"{prefix}_l{layer + layers.start}")))
    return part.to(next(rnn.parameters()).device).train(rnn.training)


def _segments(schemes: tuple[str, ...]) -> list[tuple[str, range]]:
    """Runs of consecutive layers with the same scheme: [("fp32", range(0, 1)), ("int8", range(1, 3))]."""
    runs: list[tuple[str, range]] = []
    for layer, scheme in enumerate(schemes):
        if runs and runs[-1][0] == scheme:
            runs[-1] = (scheme, range(runs[-1][1].start, layer + 1))
        else:
            runs.append((scheme, range(layer, layer + 1)))
    return runs


def join_rnn_results(*results: Any) -> tuple[Any, Any]:
    """(output, state) of a stack run as consecutive parts: the last part's output, the parts' final states
    concatenated along the layer dim (an LSTM's state is the pair (h, c))."""
    states = [r[1] for r in results]
    if isinstance(states[0], tuple):
        return results[-1][0], tuple(torch.cat(parts) for parts in zip(*states, strict=True))
    return results[-1][0], torch.cat(states)


class Bf16RNN(nn.Module):
    """An LSTM / GRU run on bf16 weights and activations (oneDNN's bf16 RNN kernels), fp32 in and out."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = copy.deepcopy(rnn).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out, state = self.rnn(x.to(torch.bfloat16))
        state = tuple(s.to(x.dtype) for s in state) if isinstance(state, tuple) else state.to(x.dtype)
        return out.to(x.dtype), state


@dataclass
class _LayerPick:
    """One layer of a stack: its scheme, int8's and bf16's measured SQNR, and each candidate's time."""

    scheme: str
    int8_db: float
    bf16_db: float | None = None
    seconds: dict[str, float] | None = None

    def describe(self, layer: int) -> str:
        measured = [f"int8 {self.int8_db:.0f} dB"] if math.isfinite(self.int8_db) else []
        measured += [f"bf16 {self.bf16_db:.0f} dB"] if self.bf16_db is not None else []
        timed = "; " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.seconds.items()) if self.seconds else ""
        return f"l{layer} {self.scheme}" + (f" ({', '.join(measured)}{timed})" if measured else "")


def _pick_layer(part: nn.RNNBase, x: torch.Tensor, int8_db: float, spec: QSpec, backend: BackendQuant,
                floor: float, timed: bool) -> _LayerPick:
    """A one-layer ``part``: int8 where it holds ``floor`` (the incumbent), else fp32; or, ``timed``, bf16 where
    bf16 holds ``floor`` and is timed faster than the incumbent, timing the kernels that will run (bf16 RNNs
    are fast only where the CPU has native bf16, int8 ones where torch's dynamic kernels beat oneDNN's: the
    timing decides, not a guess). fp32 is a candidate only where int8 does not hold: quantization="dynamic"
    keeps every layer it can in reduced precision."""
    int8_holds = int8_db >= floor
    if int8_holds and not timed:
        return _LayerPick("int8", int8_db)
    bf16 = Bf16RNN(part)
    with torch.inference_mode():
        bf16_db = outputs_sqnr_db(part(x), bf16(x))
    incumbent = ("int8", runtime_for(_RNNS[type(part)].from_float(part, spec, backend.reduce_range),
                                     backend.name)) if int8_holds else ("fp32", part)
    if not (bf16_db >= floor) or incumbent[1] is None:  # nothing to time against (no backend runs int8 here)
        return _LayerPick(incumbent[0], int8_db, bf16_db)
    candidates = {incumbent[0]: incumbent[1], "bf16": bf16}
    with torch.inference_mode():
        chosen, seconds = timing.fastest({k: (lambda m=m: m(x)) for k, m in candidates.items()}, _RNN_SCHEDULE,
                                         margin=0.1)
    return _LayerPick(chosen, int8_db, bf16_db, seconds)


def _pick_layers(rnn: nn.RNNBase, x: torch.Tensor, int8_dbs: list[float], spec: QSpec, backend: BackendQuant,
                 floor: float, timed: bool) -> list[_LayerPick]:
    """Each layer's pick, timed alone on the values the fp32 layers before it produce from ``x``."""
    picks = []
    with torch.inference_mode():
        for layer, db in enumerate(int8_dbs):
            part = _sub_rnn(rnn, range(layer, layer + 1))
            picks.append(_pick_layer(part, x, db, spec, backend, floor, timed))
            x = part(x)[0]
    return picks


def _split_rnn(gm: fx.GraphModule, node: fx.Node, rnn: nn.RNNBase, schemes: tuple[str, ...], spec: QSpec,
               reduce_range: bool) -> fx.Node:
    """Run the stack as consecutive parts, one per run of layers with the same scheme (fp32: the RNN they were;
    bf16: ``Bf16RNN``; int8: one dynamic int8 module); returns the node that joins their results."""
    parts = nn.ModuleList()
    for scheme, layers in _segments(schemes):
        part = _sub_rnn(rnn, layers)
        parts.append(_RNNS[type(rnn)].from_float(part, spec, reduce_range) if scheme == "int8" else
                     Bf16RNN(part) if scheme == "bf16" else part)
    replace_submodule(gm, str(node.target), parts)
    results, value = [], node.args[0]
    with gm.graph.inserting_before(node):
        for i in range(len(parts)):
            results.append(gm.graph.call_module(f"{node.target}.{i}", (value,)))
            value = gm.graph.call_function(operator.getitem, (results[-1], 0))
        joined = gm.graph.call_function(join_rnn_results, tuple(results))
    record_rewrite(joined, "quantize-dynamic", node)
    node.replace_all_uses_with(joined)
    gm.graph.erase_node(node)
    return joined


def _rewrite_rnn(gm: fx.GraphModule, node: fx.Node, rnn: nn.RNNBase, args: tuple | None, spec: QSpec,
                 backend: BackendQuant, floor: float, timed: bool) -> tuple[fx.Node, _Choice]:
    """An RNN called from zero state, with example inputs: each layer of the stack int8 where it holds ``floor``,
    else fp32, either replaced by bf16 where that holds and is timed faster (``_pick_layer``), the stack split
    into parts where the picks differ. Otherwise its layers int8 where they hold ``floor`` and fp16 weights
    (inside the one dynamic module) elsewhere."""
    layers = rnn.num_layers
    schemes, measured = _rnn_schemes(rnn, args, spec, backend.reduce_range, floor) if args is not None else \
        (("int8",) * layers, [math.inf] * layers)
    picks = [_LayerPick(s, db) for s, db in zip(schemes, measured, strict=True)]
    if args is not None and isinstance(args[0], torch.Tensor) and len(node.args) == 1 and not node.kwargs:
        picks = _pick_layers(rnn, args[0], measured, spec, backend, floor, timed)
        schemes = tuple(p.scheme for p in picks)
    if set(schemes) - {"int8", "fp16"}:
        node = _split_rnn(gm, node, rnn, schemes, spec, backend.reduce_range)
    else:
        replace_submodule(gm, str(node.target), _RNNS[type(rnn)].from_float(rnn, spec, backend.reduce_range,
                                                                            schemes))
    rows = " per gate row" if spec.axis is not None else ""
    per_layer = ", ".join(p.describe(i) for i, p in enumerate(picks))
    kept = [p.int8_db for p in picks if p.scheme == "int8"]  # the layers the int8 kernels run
    return node, _Choice(f"{spec.describe()}{rows}; {per_layer}", min(kept, default=math.inf),
                         any(not (db >= floor) for db in measured))


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


def _records(gm: fx.GraphModule, before: fx.GraphModule, layers: dict[str, tuple[fx.Node, _Choice]],
             ctx: PassContext) -> list[QuantLayerRecord]:
    """One record per rewritten layer (keyed by its node in ``before``; the node computing it now may differ)."""
    fp32 = capture(before, ctx.fresh_inputs(), set(layers))
    got = capture(gm, ctx.fresh_inputs(), {node.name for node, _ in layers.values()})
    records = []
    for name, (node, choice) in layers.items():
        if node.name in got and name in fp32:
            sqnr = outputs_sqnr_db(fp32[name], got[node.name]) if node.name in got else None
            local = choice.sqnr_db
            module = module_of(gm, node)
            records.append(QuantLayerRecord(
                layer=layer_name(node), op=type(module).__name__ if module is not None else "split RNN", node=name,
                observer="none (per call)", scale=0.0, zero_point=0, activation="quint8 per-tensor, per call",
                weight=choice.described, local_sqnr_db=local if math.isfinite(local) else None,
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
    # RNN layers that hold the floor in bf16 take it where it is timed faster (false: int8 wherever it holds)
    time_rnn_layers: bool = True
    share_quantize: bool = True  # sibling linears reading one tensor: one quantize, one GEMM (share_dynamic_quantize)

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
        ctx.shapes(gm, refresh=True)
        ctx.report.quantization = QuantSummary(mode="dynamic", backend=backend.name,
                                               reduce_range=backend.reduce_range,
                                               layers=_records(gm, before, layers, ctx), skipped=list(opts.skip))
        kept = [name for name, (_, c) in layers.items() if c.higher_precision]
        notes = [f"{len(layers)} layers quantized (dynamic)"]
        merged = share_dynamic_quantize(gm) if self.share_quantize else 0
        if merged:  # after the records: the merge computes the same (passes/share_dynamic_quantize.py)
            ctx.shapes(gm, refresh=True)
            notes.append(f"{merged} linears merged into siblings that read the same input (one quantize, one GEMM)")
        if kept:
            notes.append(f"int8 measured below {self.min_layer_sqnr_db:.0f} dB, kept in higher precision: "
                         + ", ".join(kept))
            log.info("quantize-dynamic: kept in higher precision (int8 below %.0f dB): %s",
                     self.min_layer_sqnr_db, ", ".join(kept))
        return PassResult(gm, bool(layers), notes)

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, mod: nn.Module, args: tuple | None,
                 opts: QuantOptions, backend: BackendQuant) -> tuple[fx.Node, _Choice]:
        """(the node that now computes the layer's value, what the layer got)."""
        path = str(node.target)
        if type(mod) in _RNNS:
            spec = _weight_spec(opts, backend, path, mod)
            return _rewrite_rnn(gm, node, mod, args, spec, backend, self.min_layer_sqnr_db, self.time_rnn_layers)
        linear = _linear_of(mod)
        assert linear is not None
        if linear is not mod and not isinstance(mod, FusedLinear):  # Conv1D: its Linear twin takes its place
            replace_submodule(gm, path, linear)
        spec = _weight_spec(opts, backend, path, linear)
        return node, _rewrite_linear(gm, node, linear, args[0] if args else None, spec, backend,
                                     self.min_layer_sqnr_db)

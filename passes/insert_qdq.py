"""insert-qdq: turn the observed graph into a reference int8 graph with explicit quantize/dequantize nodes.

Rewrites, using the plan insert-observers stored on each node:
    observer_k(v)           -> quantize_per_tensor(v, act_k_scale, act_k_zero_point, quint8)
    compute op (conv, add)  -> reads dequantize(x) for each quantized input; its output is quantized by the
                               node above (``dq -> op -> q``, the pattern the lowering passes match)
    direct op (flatten,...) -> unchanged, on the quantized tensor (``view`` becomes ``reshape``)
    share op (avg-pool)     -> dq -> op -> quantize with its input's qparams
    fp32 island / output    -> reads dequantize(x)
    weighted layers         -> weight replaced by its int8 grid values, with ``weight_scale`` /
                               ``weight_zero_point`` buffers for lowering
Qparams are buffers of the graph module read through get_attr nodes, so ``fxforge.recalibrate`` can refresh
them in place; the observed graph is kept (artifact ``observed_graph``) for that and for the report's
per-layer SQNR.
Why correct: each quantize/dequantize pair is the int8 model's rounding and everything between them is the
original fp32 op, so this graph *defines* the int8 numerics that lowered kernels must reproduce.
Preconditions: ``observed`` and ``calibrated`` (every observer holds statistics).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxforge.errors import ConfigError
from fxforge.graph.matching import module_of
from fxforge.graph.meta import fxmeta
from fxforge.numerics.provenance import ValueErrors, accumulated_errors, capture, value_keys
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.report import QuantLayerRecord, QuantSummary
from fxforge.quant.ops import weight_axis, weighted_layer
from fxforge.quant.plan import ABSORBED, CAT, DIRECT, META, OBSERVER_KEY, SHARE, group_buffers, observer_nodes, stored
from fxforge.quant.qat_modules import FakeQuantize
from fxforge.quant.qspec import BackendQuant, QSpec, backend_quant
from fxforge.quant.reference import quantize_weight
from fxforge.quant.search import WEIGHT_SCHEME_KEY, SearchResult, configured_per_channel
from fxforge.quant.sqnr import apply_op, local_errors_and_values, sample_inputs

from .insert_observers import quant_options
from .search_observers import SEARCH_ARTIFACT


def _group_qparams(gm: fx.GraphModule, spec: QSpec) -> dict[int, nn.Module]:
    """Compute each group's qparams from its observer into graph-module buffers; gid -> observer."""
    observers: dict[int, nn.Module] = {}
    for node in observer_nodes(gm):
        gid, obs = fxmeta(node)[OBSERVER_KEY], module_of(gm, node)
        if gid in observers:
            continue
        if isinstance(obs, FakeQuantize) and (obs.spec.quant_min, obs.spec.quant_max) != (spec.quant_min,
                                                                                          spec.quant_max):
            raise ConfigError(f"the model was prepared for quantization-aware training with activation range "
                              f"[{obs.spec.quant_min}, {obs.spec.quant_max}] but this target uses "
                              f"[{spec.quant_min}, {spec.quant_max}]: prepare_qat for the same target")
        scale, zero_point = obs.qparams(spec)
        scale_name, zp_name = group_buffers(gid)
        gm.register_buffer(scale_name, scale.reshape(()).float().clone())
        gm.register_buffer(zp_name, zero_point.reshape(()).long().clone())
        observers[gid] = obs
    return observers


# Direct ops whose qnnpack int8 kernel needs an NCHW-contiguous input: qnnpack's int8 clamp misreads channels-last
# tensors (errors of whole clamp ranges), which int8 cat and int8 kernels return. The reference graph runs
# under the target's engine too, so it reads a contiguous copy; the lowered kernels then feed the same copy.
_QNNPACK_NCHW_ONLY = {"relu6", "hardtanh", "clamp"}


class _Converter:
    """Walks the graph once, replacing observers by quantize nodes and adding dequantize where fp32 is read."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype, nchw_only: frozenset[str] = frozenset()) -> None:
        self.gm, self.graph, self.dtype = gm, gm.graph, dtype
        self.nchw_only = nchw_only  # kinds of direct ops that read an NCHW-contiguous copy of their input
        self.quantized: set[fx.Node] = set()
        self.dq: dict[fx.Node, fx.Node] = {}
        self.q_of_root: dict[fx.Node, fx.Node] = {}  # root value -> its quantize node
        self.requant: dict[fx.Node, fx.Node] = {}  # share op -> its quantize node

    def quantize(self, value: fx.Node, gid: int, before: fx.Node) -> fx.Node:
        scale_name, zp_name = group_buffers(gid)
        with self.graph.inserting_before(before):
            scale, zero_point = self.graph.get_attr(scale_name), self.graph.get_attr(zp_name)
            q = self.graph.call_function(torch.quantize_per_tensor, (value, scale, zero_point, self.dtype))
        self.quantized.add(q)
        return q

    def dequantize(self, value: fx.Node) -> fx.Node:
        if value not in self.dq:
            with self.graph.inserting_after(value):
                self.dq[value] = self.graph.call_method("dequantize", (value,))
        return self.dq[value]

    def read_fp32(self, node: fx.Node) -> None:
        node.args = fx.map_arg(node.args, lambda a: self.dequantize(a) if a in self.quantized else a)
        node.kwargs = fx.map_arg(node.kwargs, lambda a: self.dequantize(a) if a in self.quantized else a)

    def read_nchw(self, node: fx.Node) -> None:
        """``node`` reads an NCHW-contiguous copy of its int8 input (a no-op on one that already is)."""
        source = node.args[0]
        with self.graph.inserting_before(node):
            contiguous = self.graph.call_method("contiguous", (source,))
        fxmeta(contiguous)["quant"] = dict(stored(node), kind="contiguous", op_type=None)
        self.quantized.add(contiguous)
        node.replace_input_with(source, contiguous)

    def convert(self, node: fx.Node) -> None:
        plan = stored(node)
        if OBSERVER_KEY in fxmeta(node):
            q = self.quantize(node.args[0], fxmeta(node)[OBSERVER_KEY], before=node)
            node.replace_all_uses_with(q)
            self.graph.erase_node(node)
            self.q_of_root[q.args[0]] = q
        elif plan.get("role") == META or (plan.get("role") in (DIRECT, CAT) and plan.get("state") == "derived"):
            if plan["role"] != META:
                self.quantized.add(node)  # runs on the quantized input, keeps its qparams
            if plan.get("kind") in self.nchw_only and node.args and isinstance(node.args[0], fx.Node):
                self.read_nchw(node)
            if node.op == "call_method" and node.target == "view" and plan["role"] == DIRECT:
                # int8 cat of 1-channel maps (and int8 kernels) can return channels-last tensors, which .view
                # cannot reshape; int8 values are never changed in place, so reshape's copy is unobservable
                node.target = "reshape"
        else:
            self.read_fp32(node)
            if plan.get("role") == SHARE and plan.get("state") == "requant":
                q = self.quantize(node, plan["group"], before=node.next)
                node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
                self.requant[node] = q


def _quantize_weights(gm: fx.GraphModule, backend: BackendQuant, per_channel_of: dict[str, bool]) -> dict[str, str]:
    """Weights of the compute layers onto their int8 grid; node target -> weight spec description."""
    described: dict[str, str] = {}
    done: set[int] = set()
    for node in gm.graph.nodes:
        layer = weighted_layer(module_of(gm, node)) if stored(node).get("role") == "compute" else None
        if layer is None:
            continue
        spec = backend.weight.with_axis(weight_axis(layer) if per_channel_of[node.name] else None)
        described[node.name] = spec.describe()
        if id(layer) in done:
            continue
        done.add(id(layer))
        w, scale, zero_point = quantize_weight(layer.weight.detach(), spec)
        layer.weight.data.copy_(w)
        layer.register_buffer("weight_scale", scale)
        layer.register_buffer("weight_zero_point", zero_point)
    return described


def _heads(gm: fx.GraphModule, conv: _Converter) -> dict[str, tuple[fx.Node, fx.Node]]:
    """quantize-node name -> (the op computing the layer's value, that quantize node) for each layer."""
    heads = {q.name: (root, q) for root, q in conv.q_of_root.items()
             if stored(root).get("role") in ("compute", ABSORBED)}
    heads.update({q.name: (op, q) for op, q in conv.requant.items()})
    return heads


def _records(gm: fx.GraphModule, conv: _Converter, observed: fx.GraphModule, observers: dict[int, nn.Module],
             weights: dict[str, str], spec: QSpec, ctx: PassContext) -> list[QuantLayerRecord]:
    heads = _heads(gm, conv)
    roots = {**{q.name: root for root, q in conv.q_of_root.items()}, **{q.name: op for op, q in conv.requant.items()}}
    inputs = _report_inputs(gm, ctx)
    values, _ = capture(gm, inputs)
    cum, keys = accumulated_errors(observed, inputs, values), value_keys(observed)
    fp32_op = functools.partial(apply_op, observed)  # fp32, with the *original* weights
    first_op = {q: (op.args[0] if stored(op).get("role") == ABSORBED else op) for q, (op, _) in heads.items()}
    activation = {first_op[q].name: op for q, (op, _) in heads.items() if op is not first_op[q]}

    def reference(node: fx.Node, args: tuple, kwargs: dict) -> torch.Tensor:
        y = fp32_op(node, args, kwargs)
        act = activation.get(node.name)  # an absorbed relu runs before the layer's quantize
        return y if act is None else fp32_op(act, (y, *act.args[1:]), dict(act.kwargs))

    local, _ = local_errors_and_values(gm, inputs, {first_op[q].name: q for q in heads}, reference, set())
    records = []
    for q_name, value in roots.items():
        gid = stored(value).get("group")
        op = first_op.get(q_name, value)
        scale_name, zp_name = group_buffers(gid)
        records.append(QuantLayerRecord(
            layer=stored(op).get("layer") or ("<input>" if value.op == "placeholder" else "<root>"),
            op=_record_op(value, op), node=value.name,
            observer=("shared with its input" if value in conv.requant else observers[gid].describe()),
            scale=float(getattr(gm, scale_name)), zero_point=int(getattr(gm, zp_name)),
            activation=spec.describe(), weight=weights.get(op.name, ""),
            local_sqnr_db=_finite(local.get(q_name)) if q_name in heads else None,
            sqnr_db=_finite(_cum_db(cum, keys.get(value.name)))))
    return records


def _report_inputs(gm: fx.GraphModule, ctx: PassContext) -> tuple:
    """A few samples of the example batch when the graph runs on them (a graph may bake in the batch size)."""
    full = ctx.fresh_inputs()
    sampled = sample_inputs(full)
    if sampled is full:
        return full
    try:
        with torch.no_grad():
            gm(*sampled)
    except Exception:  # e.g. a reshape traced with the example batch size
        return full
    return sampled


def _record_op(value: fx.Node, op: fx.Node) -> str:
    """The op a record describes; values produced in fp32 (islands, skipped layers) are marked as such."""
    if value.op == "placeholder":
        return "input"
    kind = stored(op).get("kind", value.op)
    return f"{kind} (fp32 out)" if stored(op).get("role") == "float" else kind


def _cum_db(cum: dict[str, ValueErrors], key: str | None) -> float | None:
    return cum[key].sqnr_db if key in cum else None


def _finite(x: float | None) -> float | None:
    return None if x is None else (x if math.isfinite(x) else 999.0)


def _islands(gm: fx.GraphModule) -> list[str]:
    return [f"{n.name}: {stored(n)['kind']} in '{stored(n)['layer'] or '<root>'}' ({stored(n)['reason']})"
            for n in gm.graph.nodes if stored(n).get("role") == "float" and stored(n).get("reason")
            and n.op not in ("placeholder", "output", "get_attr") and "tensor_meta" in n.meta]


def _attach_search(summary: QuantSummary, search: tuple[SearchResult, str] | None) -> None:
    """search-observers ran: each searched point's comparison and gain goes into its record."""
    if search is None:
        return
    result, summary.search = search
    by_node = {r.node: r for r in result.records}
    for record in summary.layers:
        found = by_node.get(record.node)
        if found is not None:
            record.search = found.default if found.chosen == found.default else f"{found.default} -> {found.chosen}"
            record.search_gain_db = _finite(found.gain_db)


@register_pass
@dataclass(frozen=True)
class InsertQdq(Pass):
    """Observers -> quantize / dequantize nodes, weights onto the int8 grid, per-layer report."""

    name = "insert-qdq"
    requires = frozenset({"observed", "calibrated"})
    provides = frozenset({"quantized"})
    invalidates = frozenset({"observed", "calibrated"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = quant_options(ctx, self.name)
        backend = backend_quant(opts.backend, opts.reduce_range)
        observed = copy.deepcopy(gm)
        observers = _group_qparams(gm, backend.activation)
        # the scheme search-observers chose, else quant_config's
        per_channel = {n.name: fxmeta(n).get(WEIGHT_SCHEME_KEY, configured_per_channel(opts, n))
                       for n in gm.graph.nodes if stored(n).get("role") == "compute"}
        weights = _quantize_weights(gm, backend, per_channel)
        converter = _Converter(gm, backend.activation.dtype,
                               frozenset(_QNNPACK_NCHW_ONLY) if backend.name == "qnnpack" else frozenset())
        for node in list(gm.graph.nodes):
            converter.convert(node)
        gm.delete_all_unused_submodules()
        gm.recompile()
        ctx.shapes(gm, refresh=True)
        summary = QuantSummary(mode="static", backend=backend.name, reduce_range=backend.reduce_range,
                               layers=_records(gm, converter, observed, observers, weights, backend.activation, ctx),
                               islands=_islands(gm), skipped=list(opts.skip),
                               calibration_batches=ctx.artifacts.get("calibration_batches", 0))
        _attach_search(summary, ctx.artifacts.get(SEARCH_ARTIFACT))
        ctx.report.quantization = summary
        ctx.artifacts["observed_graph"] = observed
        notes = [f"{len(summary.layers)} quantized layers, {len(summary.islands)} fp32 islands, "
                 f"activations {backend.activation.describe()}"]
        return PassResult(gm, True, notes)

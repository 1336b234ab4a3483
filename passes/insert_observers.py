"""insert-observers{fake_quant=false}: put an observer after every value the quantized model will hold in int8.

Rewrites: plans the graph (``fxforge.quant.plan``: roles, quantized values, qparam groups), then after each
*root* value inserts a call of its group's observer and routes the value's readers through it::

    Before: y = conv(x); z = flatten(y)          After: x1 = observer_0(x); y = conv(x1);
                                                        y1 = observer_1(y); z = flatten(y1)
Why correct: an observer returns its input unchanged, so the observed graph computes exactly what the fp32
graph did (a test checks bit equality). Values that must share qparams share one observer module; sigmoid
and hardsigmoid outputs get a ``FixedRangeObserver`` (qparams 1/256, 0: what their int8 kernels produce).
``fake_quant=true`` (QAT) wraps each observer in a FakeQuantize; FakeQuantize modules already in the graph (a
trained QAT model being compiled) are kept, their learned qparams becoming the observers. A ``skip`` entry
whose module was merged into another op (a BatchNorm folded into its conv) is a ConfigError.
Preconditions: shapes known (the pass propagates them); quantization options in the context (an int8 target,
or ``prepare_qat``); best after fold-bn and fuse-*, so that fused ops get one observer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx, nn

from fxforge.errors import ConfigError
from fxforge.graph.matching import module_of
from fxforge.graph.meta import fxmeta
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.quant.config import QuantOptions, name_matches
from fxforge.quant.observers import FIXED_RANGES, FixedRangeObserver
from fxforge.quant.plan import COMPUTE, FLOAT, OBSERVER_KEY, QuantPlan, config_layer, plan_quantization, store
from fxforge.quant.qat_modules import FakeQuantize, SharedFakeQuantize
from fxforge.quant.qspec import backend_quant


def quant_options(ctx: PassContext, pass_name: str) -> QuantOptions:
    if ctx.quant is None:
        raise ConfigError(f"pass '{pass_name}' needs quantization settings: compile for an int8 target "
                          f"(x86, fbgemm, qnnpack) or use fxforge.prepare_qat")
    return ctx.quant


def take_fake_quants(gm: fx.GraphModule) -> dict[fx.Node, FakeQuantize]:
    """Remove FakeQuantize calls from the graph; return value -> its (trained) FakeQuantize."""
    found: dict[fx.Node, FakeQuantize] = {}
    for node in list(gm.graph.nodes):
        mod = module_of(gm, node)
        if isinstance(mod, (FakeQuantize, SharedFakeQuantize)):
            source = node.args[0]
            if isinstance(mod, FakeQuantize):  # a shared one reuses its group's: insert-qdq requantizes there
                found.setdefault(source, mod)
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
    return found


def _fixed_ranges(plan: QuantPlan) -> dict[int, tuple[float, float]]:
    """gid -> the known output range of groups whose roots are all ops of one fixed range (sigmoid, ...)."""
    ranges: dict[int, set[tuple[float, float] | None]] = {}
    for node, gid in plan.group_of.items():
        p = plan.nodes[node]
        if p.state == "root":
            ranges.setdefault(gid, set()).add(FIXED_RANGES.get(p.kind) if p.role == COMPUTE else None)
    return {gid: next(iter(found)) for gid, found in ranges.items() if len(found) == 1 and None not in found}


def _group_observers(gm: fx.GraphModule, plan: QuantPlan, opts: QuantOptions, fake_quant: bool,
                     trained: dict[fx.Node, FakeQuantize]) -> dict[int, tuple[str, nn.Module]]:
    """gid -> (submodule name, observer): trained fake-quants first, then fixed qparams where the output range
    is known (sigmoid, hardsigmoid: the qparams their int8 kernels produce), else from the layer's config."""
    spec = backend_quant(opts.backend, opts.reduce_range).activation
    chosen: dict[int, tuple[str, nn.Module]] = {}
    for node, gid in plan.group_of.items():
        if plan.nodes[node].state == "root" and node in trained:
            chosen.setdefault(gid, (f"fake_quant_{gid}", trained[node]))
    fixed = _fixed_ranges(plan)
    for node, gid in plan.group_of.items():
        if plan.nodes[node].state != "root" or gid in chosen:
            continue
        owner = config_layer(node, plan.nodes)
        layer = opts.config.resolve(owner.layer, owner.op_type, owner.kind)
        observer = FixedRangeObserver(*fixed[gid]) if gid in fixed else layer.make_observer()
        prefix = "fake_quant" if fake_quant else "observer"
        chosen[gid] = (f"{prefix}_{gid}", FakeQuantize(observer, spec) if fake_quant else observer)
    return chosen


def _insert(gm: fx.GraphModule, value: fx.Node, name: str, gid: int | None) -> None:
    with gm.graph.inserting_after(value):
        obs = gm.graph.call_module(name, (value,))
    value.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
    if gid is not None:
        fxmeta(obs)[OBSERVER_KEY] = gid
    for key in ("type", "tensor_meta"):
        if key in value.meta:
            obs.meta[key] = value.meta[key]


def _insert_requant_fake_quants(gm: fx.GraphModule, plan: QuantPlan, observers: dict[int, tuple[str, nn.Module]]
                                ) -> None:
    """QAT: the values insert-qdq requantizes with their input's qparams (average pooling) round onto the
    group's grid too, without being observed (the group's range stays that of its roots)."""
    for value, p in plan.nodes.items():
        if p.state == "requant" and isinstance(observers[p.group][1], FakeQuantize):
            name = f"requant_fake_quant_{value.name}"
            gm.add_submodule(name, SharedFakeQuantize(observers[p.group][1]))
            _insert(gm, value, name, None)


def _check_skip_matched(plan: QuantPlan, skip: tuple[str, ...]) -> None:
    """Every skip entry must still name an op: one merged into another op would be quantized silently."""
    layers = {p.layer for n, p in plan.nodes.items() if n.op not in ("placeholder", "get_attr", "output")}
    for name in skip:
        if not any(name_matches(name, layer) for layer in layers):
            raise ConfigError(
                f"skip '{name}': no op of this module is left to keep in fp32: an earlier pass folded or fused it "
                f"into another op (fold-bn folds a BatchNorm into the conv before it, fuse-* merge an add or "
                f"activation into their conv/linear) or removed it (remove-noops). Skip the op it was merged "
                f"into instead (e.g. the conv before it)")


def _island_notes(plan: QuantPlan) -> list[str]:
    islands = Counter(f"{p.kind} ({p.reason})" for n, p in plan.nodes.items()
                      if p.role == FLOAT and p.reason and n.op not in ("placeholder", "output", "get_attr")
                      and "tensor_meta" in n.meta)
    return [f"fp32 islands: {', '.join(f'{n} x {k}' for k, n in sorted(islands.items()))}"] if islands else []


@register_pass
@dataclass(frozen=True)
class InsertObservers(Pass):
    """Observers after every quantized root value (FakeQuantize modules when ``fake_quant``)."""

    name = "insert-observers"
    provides = frozenset({"observed"})
    invalidates = frozenset({"calibrated"})
    fake_quant: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = quant_options(ctx, self.name)
        ctx.shapes(gm)
        trained = take_fake_quants(gm)
        plan = plan_quantization(gm, opts)
        _check_skip_matched(plan, opts.skip)
        store(plan)
        observers = _group_observers(gm, plan, opts, self.fake_quant, trained)
        for name, module in observers.values():
            gm.add_submodule(name, module.train(gm.training))
        roots = [n for n, p in plan.nodes.items() if p.state == "root"]
        for value in roots:
            gid = plan.nodes[value].group
            _insert(gm, value, observers[gid][0], gid)
        if self.fake_quant:
            _insert_requant_fake_quants(gm, plan, observers)
        gm.delete_all_unused_submodules()
        notes = [f"{len(roots)} quantized values in {len(observers)} qparam groups"
                 + (f", {len(trained)} trained fake-quants reused" if trained else ""), *_island_notes(plan)]
        return PassResult(gm, bool(roots) or bool(trained), notes)

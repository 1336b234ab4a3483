"""search-observers: per layer, the observer and weight scheme with the best local SQNR (optional, static int8).

For each quantization point, in graph order, tries the configured observer against ``minmax``, ``histogram``,
``mse`` (histogram without its clipping bound) and ``percentile`` ranges, and for each conv/linear
per-channel against per-tensor weights, keeping the choice whose int8 output is closest to the layer's fp32
op on the same inputs (``fxforge.quant.search``)::

    Before: y = conv(x); y1 = observer_3(y)        # observer_3: histogram(mse), weights per-channel
    After:  y = conv(x); y1 = observer_3(y)        # observer_3: percentile(99.9), weights per-tensor
The chosen observer replaces the group's module (``fxforge.recalibrate`` keeps using that kind), the weight
scheme is recorded on the compute node for insert-qdq, and the report shows each point's choice and gain.
Why correct: observers are identities and the weight scheme only changes how insert-qdq rounds the weights,
so the graph computes the same fp32 function; only the int8 rounding moves, towards fp32 on the data.
Data: the calibration items when they can be read again (a list, tuple or tensor; at most ``batches`` and
``calibration_batches`` of them), else the example inputs; no labels.
Preconditions: ``observed`` and ``calibrated``; before insert-qdq.
Usage: ``extra_passes={"after:calibrate": "search-observers"}``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import fx

from fxforge.graph.meta import fxmeta
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.quant.calibration import as_args, input_names
from fxforge.quant.plan import OBSERVER_KEY, observer_nodes
from fxforge.quant.qspec import backend_quant
from fxforge.quant.search import (
    DEFAULT_ACTIVATIONS,
    WEIGHT_CHOICES,
    WEIGHT_SCHEME_KEY,
    ObserverSearch,
    SearchResult,
    collect_histograms,
    configured_per_channel,
    parse_activation,
)

from .insert_observers import quant_options

SEARCH_ARTIFACT = "observer_search"  # ctx.artifacts key: (SearchResult, one-line summary) for insert-qdq


def _split(text: str, what: str) -> list[str]:
    items = [t for t in text.split("+") if t]
    if not items:
        raise ValueError(f"search-observers {what}={text!r}: give a '+'-joined list")
    return items


def _batches(gm: fx.GraphModule, ctx: PassContext, cap: int) -> tuple[list[tuple], str]:
    """(search batches as forward args, where they came from)."""
    opts = ctx.quant
    items = opts.calibration
    if isinstance(items, torch.Tensor):
        items = [items]
    if isinstance(items, (list, tuple)) and items:
        limit = min(cap, opts.calibration_batches or cap)
        device = next((x.device for x in ctx.example_inputs if isinstance(x, torch.Tensor)), "cpu")
        chosen = [as_args(item, input_names(gm), device)[0] for item in itertools.islice(items, limit)]
        return chosen, f"{len(chosen)} calibration batches"
    return [ctx.fresh_inputs()], "the example inputs (calibration data that can be read again, a list, was not given)"


def _keep_choices(gm: fx.GraphModule, result: SearchResult) -> None:
    """Chosen observers replace their group's module; chosen weight schemes go on the compute nodes."""
    for node in observer_nodes(gm):
        chosen = result.observers.get(fxmeta(node)[OBSERVER_KEY])
        if chosen is not None:
            gm.add_submodule(str(node.target), chosen.train(gm.training))
    for node in gm.graph.nodes:
        if node.name in result.per_channel:
            fxmeta(node)[WEIGHT_SCHEME_KEY] = result.per_channel[node.name]


@register_pass
@dataclass(frozen=True)
class SearchObservers(Pass):
    """Per-layer choice of observer and weight scheme by local SQNR on the calibration data."""

    name = "search-observers"
    requires = frozenset({"observed", "calibrated"})
    activations: str = "+".join(DEFAULT_ACTIVATIONS)
    weights: str = "per-channel+per-tensor"
    batches: int = 8
    min_gain_db: float = 0.05

    def __post_init__(self) -> None:
        for choice in _split(self.activations, "activations"):
            parse_activation(choice)
        unknown = [w for w in _split(self.weights, "weights") if w not in WEIGHT_CHOICES]
        if unknown:
            raise ValueError(f"search-observers weights: unknown {unknown}; valid: {'+'.join(WEIGHT_CHOICES)}")
        if self.batches < 1 or self.min_gain_db < 0:
            raise ValueError("search-observers: batches must be >= 1 and min_gain_db >= 0")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = quant_options(ctx, self.name)
        if not observer_nodes(gm):
            return PassResult(gm, False, ["no quantization points to search"])
        batches, source = _batches(gm, ctx, self.batches)
        histograms, extra_pass = collect_histograms(gm, batches)
        search = ObserverSearch(gm, backend_quant(opts.backend, opts.reduce_range),
                                _split(self.activations, "activations"),
                                [WEIGHT_CHOICES[w] for w in _split(self.weights, "weights")],
                                lambda node: configured_per_channel(opts, node), self.min_gain_db)
        result = search.search(batches, histograms)
        _keep_choices(gm, result)
        changed = [r for r in result.records if r.chosen != r.default]
        forwards = result.forwards + extra_pass
        summary = (f"observer search on {source}: {len(changed)} of {len(result.records)} quantization points "
                   f"changed, cost ~{forwards:.1f} model forwards over them (conv/linear runs counted)")
        ctx.artifacts[SEARCH_ARTIFACT] = (result, summary)
        notes = [summary, *(f"{r.layer or r.node}: {r.default} -> {r.chosen} ({r.default_db:.1f} -> "
                            f"{r.chosen_db:.1f} dB)" for r in changed[:10])]
        return PassResult(gm, bool(changed), notes)

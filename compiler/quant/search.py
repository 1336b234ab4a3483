"""Per-layer search of observer and weight scheme on the calibration data (the ``search-observers`` pass).

For every quantization point of an observed, calibrated graph, in graph order, the configured observer is
tried against ``minmax``, ``histogram``, ``mse`` (the histogram's MSE range without its clipping bound),
``percentile:99.99`` and ``percentile:99.9`` (``entropy`` on request),
all computed from one histogram per qparam group, and each conv/linear's weights per-channel against
per-tensor. The choice with the best *local* SQNR is kept: the layer's int8 output against its fp32 op (original
weights) on the same, already quantized, inputs, summed over the search batches (the report's "local dB").
The graph is emulated as insert-qdq's reference graph computes it, one fx.Interpreter per batch, stepped
node by node together.
Why greedy is sound enough: when a layer is decided its inputs are final, and its choice changes only its
own rounding error; independent rounding noises add in power, so minimising each layer's own noise roughly
minimises the output noise. It is not exact (noises correlate); insert-qdq's final SQNR shows the result.
The configured choice wins ties and gains under ``min_gain_db``: on the search data no layer gets worse.
Cost: ``1 + len(weight choices)`` model forwards over the search batches, plus one when the configured
observer keeps no histogram; every batch's values are alive at once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxforge.graph.matching import call_count
from fxforge.graph.meta import fxmeta
from fxforge.progress import bar

from .config import QuantOptions
from .deprecation import quantized_tensors_quietly
from .observers import (
    FixedRangeObserver,
    HistogramBasedObserver,
    HistogramObserver,
    MinMaxObserver,
    Observer,
    make_observer,
    observers_paused,
)
from .ops import weight_axis, weighted_layer
from .plan import ABSORBED, OBSERVER_KEY, observer_nodes, stored
from .qat_modules import FakeQuantize
from .qspec import BackendQuant
from .reference import quantize_weight
from .sqnr import apply_op

WEIGHT_SCHEME_KEY = "weight_per_channel"  # fxmeta key on a compute node: the searched weight scheme
DEFAULT_ACTIVATIONS = ("minmax", "histogram", "mse", "percentile:99.99", "percentile:99.9")
ACTIVATION_CHOICES = ("minmax", "histogram", "mse", "percentile:<p>", "entropy")
WEIGHT_CHOICES = {"per-channel": True, "per-tensor": False}


def configured_per_channel(opts: QuantOptions, node: fx.Node) -> bool:
    """The weight scheme quant_config gives a compute node (what insert-qdq uses without a search)."""
    plan = stored(node)
    return opts.config.resolve(plan["layer"], plan["op_type"], plan["kind"]).per_channel


def parse_activation(text: str) -> tuple[str, dict[str, float | None]]:
    """``"percentile:99.9"`` -> ("percentile", {"percentile": 99.9}); ValueError on anything unknown."""
    kind, _, arg = text.partition(":")
    if kind == "percentile" and arg:
        p = float(arg)
        if not 50.0 < p <= 100.0:
            raise ValueError(f"percentile {arg} must be in (50, 100]")
        return kind, {"percentile": p}
    if kind in ("minmax", "histogram", "entropy") and not arg:
        return kind, {}
    if kind == "mse" and not arg:  # the histogram's MSE range without its clipping bound
        return "histogram", {"max_clipped": None}
    raise ValueError(f"unknown activation choice {text!r}; valid: {', '.join(ACTIVATION_CHOICES)}")


def observer_from_histogram(choice: str, source: HistogramBasedObserver) -> Observer:
    """A calibrated observer of kind ``choice`` whose statistics are those of ``source``'s histogram."""
    kind, options = parse_activation(choice)
    if kind == "minmax":  # the histogram's range is the exact min / max of the (finite) data
        obs = MinMaxObserver()
        obs.min_val, obs.max_val = source.min_val.clone(), source.max_val.clone()
        obs.set_extra_state(source.get_extra_state())
        return obs
    obs = make_observer(kind, bins=source.bins, **options)
    obs.load_state_dict(source.state_dict())
    return obs


@dataclass
class SearchRecord:
    """The choice kept for one quantization point and what it gained on the search data."""

    node: str  # the quantized value (the report's ``node``)
    layer: str
    default: str
    chosen: str
    default_db: float
    chosen_db: float

    @property
    def gain_db(self) -> float:
        if self.chosen_db == self.default_db:  # also inf == inf
            return 0.0
        return self.chosen_db - self.default_db


@dataclass
class SearchResult:
    records: list[SearchRecord] = field(default_factory=list)
    observers: dict[int, Observer] = field(default_factory=dict)  # gid -> chosen observer (changed ones only)
    per_channel: dict[str, bool] = field(default_factory=dict)  # compute node -> chosen scheme (changed only)
    forwards: float = 0.0  # model forward passes spent, in units of one forward over the search batches


def _db(signal: float, noise: float) -> float:
    """SQNR in dB; a NaN/inf noise (a candidate that overflowed) scores -inf, never above a finite one."""
    if not math.isfinite(noise) or not math.isfinite(signal):
        return -math.inf
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _power(ref: torch.Tensor) -> float:
    return float(ref.float().square().sum(dtype=torch.float64))  # squares in float32, the sum in float64


def _noise(ref: torch.Tensor, value: torch.Tensor) -> float:
    return float((value.float() - ref.float()).square().sum(dtype=torch.float64))


@dataclass(frozen=True)
class _Option:
    """One activation choice of a group: its description, observer and qparams."""

    name: str
    observer: nn.Module
    scale: float
    zero_point: int


@contextmanager
def _weight(layer: nn.Module, value: torch.Tensor | None) -> Any:
    """Run ``layer`` with ``value`` as its weight (None: unchanged)."""
    if value is None:
        yield
        return
    original = layer.weight.data
    layer.weight.data = value
    try:
        yield
    finally:
        layer.weight.data = original


class ObserverSearch:
    """The greedy search over one observed, calibrated graph (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, backend: BackendQuant, activations: Sequence[str],
                 weights: Sequence[bool], configured_per_channel: Callable[[fx.Node], bool],
                 min_gain_db: float = 0.05) -> None:
        self.gm, self.backend, self.spec = gm, backend, backend.activation
        self.activations, self.weights, self.min_gain_db = tuple(activations), tuple(weights), min_gain_db
        self.configured_per_channel = configured_per_channel
        self.group_nodes = {fxmeta(n)[OBSERVER_KEY]: n for n in reversed(observer_nodes(gm))}  # gid -> first
        self.decided: dict[int, _Option] = {}
        self.per_channel: dict[str, bool] = {}  # compute node -> scheme used in the emulation
        self.qweights: dict[tuple[int, bool], torch.Tensor] = {}
        self.result = SearchResult()
        self.layer_runs = 0

    # candidates -------------------------------------------------------------------------------------------
    def _option(self, name: str, observer: nn.Module) -> _Option:
        scale, zero_point = observer.qparams(self.spec)
        return _Option(name, observer, float(scale.reshape(())), int(zero_point.reshape(())))

    def _options(self, gid: int, histograms: dict[int, HistogramBasedObserver]) -> list[_Option]:
        """The configured observer first, then the other choices with qparams of their own."""
        configured = self.gm.get_submodule(str(self.group_nodes[gid].target))
        options = [self._option(configured.describe(), configured)]
        if isinstance(configured, FakeQuantize) or gid not in histograms:
            return options  # trained QAT qparams are kept
        seen = {(options[0].scale, options[0].zero_point)}
        for choice in self.activations:
            observer = observer_from_histogram(choice, histograms[gid])
            option = self._option(observer.describe(), observer)
            if (option.scale, option.zero_point) not in seen:  # same qparams: same numerics, nothing to try
                seen.add((option.scale, option.zero_point))
                options.append(option)
        return options

    def _qweight(self, layer: nn.Module, per_channel: bool) -> torch.Tensor:
        key = (id(layer), per_channel)
        if key not in self.qweights:
            spec = self.backend.weight.with_axis(weight_axis(layer) if per_channel else None)
            self.qweights[key] = quantize_weight(layer.weight.detach(), spec)[0]
        return self.qweights[key]

    # emulation --------------------------------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor, option: _Option) -> torch.Tensor:
        with quantized_tensors_quietly():
            q = torch.quantize_per_tensor(x.float(), option.scale, option.zero_point, self.spec.dtype)
        return q.dequantize()

    def search(self, batches: Sequence[tuple], histograms: dict[int, HistogramBasedObserver],
               progress: bool = True) -> SearchResult:
        self.histograms = histograms
        runner = _Lockstep(self.gm, batches)
        with torch.no_grad():
            nodes = bar(list(self.gm.graph.nodes), desc="searching observers", unit="node",
                        show=progress)
            for node in nodes:
                runner.set(node, self._step(node, runner))
                if node.op == "output":
                    break
        # conv/linear runs dominate: one emulated forward, plus the extra runs of the searched layers
        weighted = sum(1 for n in self.gm.graph.nodes if n.name in self.per_channel)
        self.result.forwards = 1 + self.layer_runs / max(1, weighted)
        return self.result

    def _step(self, node: fx.Node, runner: _Lockstep) -> list[Any]:
        if OBSERVER_KEY in fxmeta(node):
            gid = fxmeta(node)[OBSERVER_KEY]
            values = [args[0] for args, _ in runner.fetch(node)]
            if gid not in self.decided:  # a value no conv/linear computes (input, add, ...): activations only
                options, noise, signal = self._group_options(gid), defaultdict(float), 0.0
                for v in values:
                    signal += _power(v)
                    self._score(noise, None, v, v, options)
                self._decide(node.args[0], gid, options, signal, noise, None)
            return [self.fake_quant(v, self.decided[gid]) for v in values]
        layer = weighted_layer(self.gm.get_submodule(str(node.target))) if node.op == "call_module" else None
        plan = stored(node)
        if layer is not None and plan.get("role") == "compute":
            return self._weighted(node, layer, runner)
        out = runner.run(node)
        if plan.get("state") == "requant":  # average pooling: requantized with its input's qparams
            out = [self.fake_quant(v, self.decided[plan["group"]]) for v in out]
        return out

    def _group_options(self, gid: int | None) -> list[_Option | None]:
        if gid is None:
            return [None]  # the value is not quantized (changed in place): weights only
        return [self.decided[gid]] if gid in self.decided else self._options(gid, self.histograms)

    def _score(self, noise: dict, scheme: bool | None, value: torch.Tensor, ref: torch.Tensor,
               options: list[_Option | None]) -> None:
        """Add one batch's noise of each activation option, for weight scheme ``scheme``."""
        for i, option in enumerate(options):
            noise[(scheme, i)] += _noise(ref, value if option is None else self.fake_quant(value, option))

    def _weighted(self, node: fx.Node, layer: nn.Module, runner: _Lockstep) -> list[Any]:
        """A conv/linear: decide its weight scheme (and its output group when still open) here, batch by batch
        (only each scheme's outputs are kept until the choice is made)."""
        configured = self.configured_per_channel(node)
        searchable = call_count(self.gm, str(node.target)) == 1  # a shared layer has one weight for all calls
        schemes = list(dict.fromkeys((configured, *self.weights))) if searchable else [configured]
        act = next((u for u in node.users if stored(u).get("role") == ABSORBED), None)
        root = act or node
        obs = next((u for u in root.users if OBSERVER_KEY in fxmeta(u)), None)
        gid = fxmeta(obs)[OBSERVER_KEY] if obs is not None else None
        if gid is not None and isinstance(self.gm.get_submodule(str(obs.target)), FakeQuantize):
            schemes = [configured]  # quantization-aware training: the weights were trained on this scheme
        self.per_channel[node.name] = configured
        if len(schemes) == 1 and (gid is None or gid in self.decided):
            with _weight(layer, self._qweight(layer, configured)):
                return runner.run(node)
        self.layer_runs += len(schemes)  # the fp32 reference and one run per scheme, instead of one run
        options, noise, signal = self._group_options(gid), defaultdict(float), 0.0
        outs: dict[bool, list[Any]] = {scheme: [] for scheme in schemes}
        for args, kwargs in runner.fetch(node):
            ref = self._through(act, apply_op(self.gm, node, args, kwargs))
            signal += _power(ref)
            for scheme in schemes:
                with _weight(layer, self._qweight(layer, scheme)):
                    outs[scheme].append(apply_op(self.gm, node, args, kwargs))
                self._score(noise, scheme, self._through(act, outs[scheme][-1]), ref, options)
        scheme = self._decide(root, gid, options, signal, noise, configured)
        self.per_channel[node.name] = scheme
        if scheme != configured:
            self.result.per_channel[node.name] = scheme
        return outs[scheme]

    def _through(self, act: fx.Node | None, y: torch.Tensor) -> torch.Tensor:
        """An absorbed activation (relu after a conv) applied in fp32, as the reference graph runs it."""
        return y if act is None else apply_op(self.gm, act, (y, *act.args[1:]), dict(act.kwargs))

    def _decide(self, value: fx.Node, gid: int | None, options: list[_Option | None], signal: float,
                noise: dict[tuple[Any, int], float], configured: bool | None) -> Any:
        """Pick (weight scheme, activation option) with the best local SQNR; returns the scheme."""
        scores = {key: _db(signal, n) for key, n in noise.items()}
        default = (configured, 0)
        best = self._pick(scores, default)
        if gid is not None and gid not in self.decided:
            self.decided[gid] = options[best[1]]
            if best[1] != 0:
                self.result.observers[gid] = options[best[1]].observer
        if len(scores) > 1:
            self.result.records.append(SearchRecord(
                node=value.name, layer=stored(value.args[0] if stored(value).get("role") == ABSORBED else value)
                .get("layer", ""), default=self._describe(default, options),
                chosen=self._describe(best, options), default_db=scores[default], chosen_db=scores[best]))
        return best[0]

    def _pick(self, scores: dict[tuple[Any, int], float], default: tuple[Any, int]) -> tuple[Any, int]:
        """The best choice, preferring the configured scheme and observer among those within ``min_gain_db``
        of it (noise-level differences keep the configuration); the default unless it gains ``min_gain_db``."""
        top = max(scores.values())
        near = [k for k in scores if scores[k] >= top - self.min_gain_db]
        best = min(near, key=lambda k: (k[0] != default[0], k[1] != default[1], -scores[k]))
        return best if scores[best] >= scores[default] + self.min_gain_db else default

    @staticmethod
    def _describe(key: tuple[Any, int], options: list[_Option | None]) -> str:
        scheme, i = key
        parts = [] if options[i] is None else [options[i].name]
        if scheme is not None:
            parts.append("per-channel weights" if scheme else "per-tensor weights")
        return ", ".join(parts)


class _Lockstep:
    """One fx.Interpreter per batch, stepped together node by node (values freed after their last use)."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple]) -> None:
        self.interps = [fx.Interpreter(gm) for _ in batches]
        for interp, args in zip(self.interps, batches, strict=True):
            interp.args_iter = iter(args)
        self.last_uses = self.interps[0].user_to_last_uses if self.interps else {}

    def fetch(self, node: fx.Node) -> list[tuple[tuple, dict]]:
        return [interp.fetch_args_kwargs_from_env(node) for interp in self.interps]

    def run(self, node: fx.Node) -> list[Any]:
        return [interp.run_node(node) for interp in self.interps]

    def set(self, node: fx.Node, values: list[Any]) -> None:
        for interp, value in zip(self.interps, values, strict=True):
            interp.env[node] = value
            for dead in self.last_uses.get(node, []):
                del interp.env[dead]


def collect_histograms(gm: fx.GraphModule, batches: Sequence[tuple], bins: int = 2048
                       ) -> tuple[dict[int, HistogramBasedObserver], bool]:
    """(gid -> a histogram of the group's values, whether the graph ran for them): the configured observer's
    own when it keeps one, else one filled by running ``batches`` through the graph with a fresh
    HistogramObserver in its place."""
    found: dict[int, HistogramBasedObserver] = {}
    fresh: dict[str, tuple[nn.Module, HistogramObserver]] = {}
    for node in observer_nodes(gm):
        gid, name = fxmeta(node)[OBSERVER_KEY], str(node.target)
        module = gm.get_submodule(name)
        if isinstance(module, HistogramBasedObserver):
            found[gid] = module
        elif not isinstance(module, (FakeQuantize, FixedRangeObserver)) and name not in fresh:
            fresh[name] = (module, HistogramObserver(bins=bins))
            found[gid] = fresh[name][1]
    if fresh:
        for name, (_, histogram) in fresh.items():
            gm.add_submodule(name, histogram)
        try:  # only the fresh histograms record: the calibrated observers saw these batches already
            with torch.no_grad(), observers_paused(recording=[h for _, h in fresh.values()]):
                for args in batches:
                    gm(*args)
        finally:
            for name, (original, _) in fresh.items():
                gm.add_submodule(name, original)
    return found, bool(fresh)

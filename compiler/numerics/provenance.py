"""Which value of the traced model each node of a rewritten graph computes, and errors value by value.

Every rewrite records the original nodes it replaced (``record_rewrite``: ``origins``, the last one being
the value the new node computes), so a node's *key* is:
- ``origins[-1]`` for a rewritten node (a fused conv+bn+relu computes the relu's value);
- its input's key for nodes that only change a value's representation (observers, quantize, dequantize,
  dynamic quantization, ``contiguous``);
- its own name otherwise: nodes keep the names the tracer gave them, and new names never reuse old ones.
Two graphs derived from the same trace can then be compared value by value:
- the *accumulated* error of a value: graph B's value against graph A's, each run on the same inputs;
- the *local* error: B's value against A's op run on B's own values of its inputs (``local_errors``), i.e.
  what this op adds. A region fused into one node in B is run from A's nodes between matched values.
  ``rounded=True`` compares each value in its final form instead (A's last node computing it: after its
  quantize / dequantize), where an int8 kernel must reproduce the reference graph's rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxforge.graph.meta import fxmeta
from fxforge.quant.observers import Observer, observers_paused
from fxforge.quant.plan import OBSERVER_KEY
from fxforge.quant.qat_modules import FakeQuantize, SharedFakeQuantize
from fxforge.quant.reference import dynamic_quantize
from fxforge.quant.sqnr import sqnr_db

_PASSTHROUGH_METHODS = {"dequantize", "contiguous"}


def _passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node that only changes how its input's value is represented (or watches it)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _PASSTHROUGH_METHODS
    if node.op == "call_function":
        return node.target in (torch.quantize_per_tensor, dynamic_quantize)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return OBSERVER_KEY in fxmeta(node) or isinstance(module, (Observer, FakeQuantize, SharedFakeQuantize))
    return False


def value_keys(gm: fx.GraphModule) -> dict[str, str]:
    """node name -> the traced value it computes (see the module docstring); get_attr/output nodes have none."""
    keys: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        origins = fxmeta(node).get("origins")
        if origins:
            keys[node.name] = origins[-1]
        elif _passthrough(gm, node):
            if node.args[0].name in keys:
                keys[node.name] = keys[node.args[0].name]
        else:
            keys[node.name] = node.name
    return keys


def as_float(value: Any) -> Any:
    return value.dequantize() if isinstance(value, torch.Tensor) and value.is_quantized else value


class _Capture(fx.Interpreter):
    """Keeps every tensor value under its key: the last node's value (its final form, e.g. after rounding),
    and the first node computing it (the op; later ones only re-represent it)."""

    def __init__(self, gm: fx.GraphModule, keys: dict[str, str]) -> None:
        super().__init__(gm)
        self.keys, self.values, self.nodes = keys, {}, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        key = self.keys.get(n.name)
        if key is not None and isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_quantized):
            self.values[key] = as_float(out).detach().clone()  # later in-place ops must not change it
            self.nodes.setdefault(key, n)
        return out


def capture(gm: fx.GraphModule, inputs: tuple, keys: dict[str, str] | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, fx.Node]]:
    """(key -> value as float, key -> the node that computed it) for ``gm`` run on ``inputs`` (observers in
    ``gm`` do not record them: they are not calibration data)."""
    interp = _Capture(gm, value_keys(gm) if keys is None else keys)
    with torch.no_grad(), observers_paused():
        interp.run(*inputs)
    return interp.values, interp.nodes


@dataclass
class ValueErrors:
    """Errors of one value of graph B against graph A."""

    sqnr_db: float
    max_abs_error: float
    max_rel_error: float  # max abs error / max |A's value|
    differing: float = 0.0  # the fraction of elements that differ at all


def errors(reference: torch.Tensor, value: torch.Tensor) -> ValueErrors:
    ref, val = reference.detach().double(), value.detach().double()
    diff = (ref - val).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    differing = (ref != val).double().mean().item() if ref.numel() else 0.0
    return ValueErrors(sqnr_db(ref, val), diff, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf),
                       differing)


def accumulated_errors(reference: fx.GraphModule, inputs: tuple, values: dict[str, torch.Tensor]
                       ) -> dict[str, ValueErrors]:
    """key -> the error accumulated up to that value: graph B's value (``values``, from ``capture``) against
    ``reference`` run on ``inputs``; values whose shapes differ are left out. The one computation behind the
    report's per-layer "cum dB" column and ``fxforge.debug.compare``."""
    ref_values, _ = capture(reference, inputs)
    return {key: errors(ref_values[key], value) for key, value in values.items()
            if key in ref_values and ref_values[key].shape == value.shape}


class _Substitute(fx.Interpreter):
    """Runs graph A; wherever graph B has the same value, records A's op result against B's and continues
    with B's value (so each op of A sees B's inputs). ``rounded``: only at the last node computing each value."""

    def __init__(self, gm: fx.GraphModule, keys: dict[str, str], values: dict[str, torch.Tensor],
                 rounded: bool = False) -> None:
        super().__init__(gm)
        self.keys, self.values, self.local = keys, values, {}
        last = {keys[n.name]: n for n in gm.graph.nodes if n.name in keys}
        self.at = set(last.values()) if rounded else None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        key = self.keys.get(n.name)
        if self.at is not None and n not in self.at:
            return out
        other = self.values.get(key) if key is not None else None
        if other is None or not isinstance(out, torch.Tensor) or out.shape != other.shape:
            return out
        self.local.setdefault(key, errors(as_float(out), other))
        if out.is_quantized or not out.is_floating_point():
            return out  # B's value is kept as float: it cannot stand in for a quantized tensor
        return torch.empty_like(out).copy_(other)  # A's layout (a later .view may need it)


def local_errors(reference: fx.GraphModule, inputs: tuple, values: dict[str, torch.Tensor],
                 keys: dict[str, str] | None = None, *, rounded: bool = False) -> dict[str, ValueErrors]:
    """key -> the error graph B adds at that value (``values`` are B's, from ``capture``); ``rounded``: at
    the value's final form in ``reference`` (see the module docstring)."""
    interp = _Substitute(reference, value_keys(reference) if keys is None else keys, values, rounded)
    with torch.no_grad(), observers_paused():
        interp.run(*inputs)
    return interp.local

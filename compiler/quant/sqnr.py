"""SQNR (signal-to-quantization-noise ratio, dB) of a quantized graph against its fp32 original, per layer.

For every quantization point of a layer two numbers are measured on the example inputs:
- ``sqnr_db``: the quantized graph's value there against the fp32 graph's (error accumulated so far);
- ``local_sqnr_db``: the layer's own error: its int8 output against its fp32 op (original weights) run on
  the *same* dequantized inputs, i.e. what this layer adds (weight rounding and output rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from .observers import observers_paused


def apply_op(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """``node``'s op (module, method or function call) on the given arguments, with ``gm``'s modules."""
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def same_values(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal, or NaN on both sides (infinities of one sign are equal)."""
    return (actual == expected) | (actual.isnan() & expected.isnan())


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    """10*log10(|ref|^2 / |ref - value|^2); inf when equal.

    Non-finite values are never hidden: a NaN or infinity on one side only (or infinities of opposite signs)
    gives -inf, which fails every floor check; elements holding the same non-finite value on both sides
    agree and are left out of signal and noise."""
    reference, value = reference.detach().double(), value.detach().double()
    if reference.is_quantized or value.is_quantized:
        raise TypeError("dequantize before computing SQNR")
    if reference.shape != value.shape:
        raise ValueError(f"SQNR of values of different shapes: {tuple(reference.shape)}, {tuple(value.shape)}")
    differ = ~same_values(reference, value)
    if not (reference[differ].isfinite().all() and value[differ].isfinite().all()):
        return -math.inf
    finite = reference.isfinite()
    noise = (reference[differ] - value[differ]).pow(2).sum().item()
    signal = reference[finite].pow(2).sum().item()
    if noise == 0:
        return math.inf
    if not math.isfinite(noise):  # finite values whose squares overflow double: as wrong as it gets
        return -math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _as_float(value: Any) -> Any:
    return value.dequantize() if isinstance(value, torch.Tensor) and value.is_quantized else value


def outputs_sqnr_db(reference: Any, value: Any) -> float:
    """SQNR over all tensor outputs taken together: the tensor leaves of any pytree (a tensor; tuples, lists,
    dicts, ModelOutputs or registered dataclasses of them)."""
    refs = [r for r in tree_leaves(reference) if isinstance(r, torch.Tensor)]
    vals = [_as_float(v) for v in tree_leaves(value) if isinstance(v, torch.Tensor)]
    if not refs or len(refs) != len(vals):
        return -math.inf
    if any(r.shape != v.shape for r, v in zip(refs, vals, strict=True)):
        return -math.inf
    return sqnr_db(torch.cat([r.flatten().double() for r in refs]), torch.cat([v.flatten().double() for v in vals]))


class _Capture(fx.Interpreter):
    """Runs a graph, keeping the values of the nodes named in ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = _as_float(out)
        return out


class _LocalError(_Capture):
    """Runs the quantized graph; at each layer head also runs ``reference(head, args, kwargs)`` (the fp32 op
    on the same inputs) and keeps it until that layer's quantize node produces its value. Like ``_Capture``
    it also keeps the values of the nodes named in ``keep`` (one run of the graph serves both)."""

    def __init__(self, gm: fx.GraphModule, heads: dict[str, str],
                 reference: Callable[[fx.Node, tuple, dict], torch.Tensor], keep: set[str] = frozenset()) -> None:
        super().__init__(gm, keep)
        self.heads, self.reference = heads, reference  # head node name -> quantize node name
        self.pending: dict[str, torch.Tensor] = {}
        self.local: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.heads:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.pending[self.heads[n.name]] = self.reference(n, args, kwargs)
        out = super().run_node(n)
        if n.name in self.pending:
            self.local[n.name] = sqnr_db(self.pending.pop(n.name), _as_float(out))
        return out


REPORT_SAMPLES = 4  # the per-layer report runs the graphs on at most this many samples of the example batch


def sample_inputs(inputs: tuple) -> tuple:
    """The first REPORT_SAMPLES items of a batched example input (all tensors sharing their first dim), else
    the inputs unchanged: the per-layer report runs the graph three times, which at large batches would cost
    more than the rest of the compile."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    sizes = {x.shape[0] if x.dim() else None for x in tensors}
    if len(sizes) != 1 or None in sizes or next(iter(sizes)) <= REPORT_SAMPLES:
        return inputs
    return tuple(x[:REPORT_SAMPLES].clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def capture(gm: fx.GraphModule, inputs: tuple, keep: set[str]) -> dict[str, torch.Tensor]:
    """The values of the nodes named in ``keep`` on ``inputs`` (observers in ``gm`` do not record them)."""
    with torch.no_grad(), observers_paused():
        interp = _Capture(gm, keep)
        interp.run(*inputs)
    return interp.values


def local_errors_and_values(gm: fx.GraphModule, inputs: tuple, heads: dict[str, str],
                            reference: Callable[[fx.Node, tuple, dict], torch.Tensor],
                            keep: set[str]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """quantize-node name -> local SQNR (see the module docstring), and ``capture(gm, inputs, keep)``, from one
    run of the graph. Observers in ``gm`` do not record ``inputs`` (they are not calibration data)."""
    with torch.no_grad(), observers_paused():
        interp = _LocalError(gm, heads, reference, keep)
        interp.run(*inputs)
    return interp.local, interp.values

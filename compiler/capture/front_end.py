"""Choosing the front end: torch.fx symbolic tracing (``tracing``) or torch.export (``export``).

``capture="auto"`` traces symbolically first and exports when tracing fails: on the zoo both capture the
same models to the same module-level graphs, symbolic tracing is several times faster (no fake-tensor
run) and keeps the model's own Python structure; export captures what tracing cannot (Hugging Face
transformers: kwargs handling, ModelOutput, caches) and records which dimensions are dynamic. A model that
neither captures gets one ``TraceError`` with both reasons.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fxforge.errors import ConfigError, InputShapeError, TraceError

from .export import DynamicSpec, default_axes, export_model
from .signature import CallSignature, bind_call, example_args, static_contract
from .tracing import bind_default_arguments, trace, user_frame

CAPTURE_MODES = ("auto", "symbolic", "export")


@dataclass
class Captured:
    """A captured model: its graph (flat positional inputs), how calls map onto it, and how it was made."""

    gm: fx.GraphModule
    inputs: tuple[Any, ...]  # the example inputs as the graph takes them
    signature: CallSignature
    front_end: str
    reason: str
    leaf_modules: dict[str, str] = field(default_factory=dict)
    bound_arguments: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def example_call(model: nn.Module, example_inputs: Any) -> tuple[inspect.Signature, dict[str, Any]]:
    """(forward's signature, the example inputs bound to it by name): a dict is keyword arguments
    (``model(**batch)``), a tuple or list one value per positional argument, anything else the one argument."""
    if example_inputs is None:
        raise ConfigError("compile needs example_inputs=: a tensor, or a tuple with one value per forward argument, "
                          "or a dict of keyword arguments (model(**batch))")
    args, kwargs = example_args(example_inputs)
    parameters = inspect.signature(model.forward)
    try:
        return parameters, bind_call(parameters, args, kwargs)
    except InputShapeError as exc:
        bind_default_arguments(model, len(args))  # a wrong count of positional inputs: its own message
        raise ConfigError(f"example_inputs do not fit {type(model).__name__}.forward: {exc}") from exc


def capture(model: nn.Module, example_inputs: Any, *, mode: str = "auto", dynamic: DynamicSpec = None,
            leaf_modules: Sequence[str | type] = (), concrete_args: dict[str, Any] | None = None) -> Captured:
    """Capture ``model`` (a private copy: its submodules move into the graph) with the chosen front end."""
    if mode not in CAPTURE_MODES:
        raise ConfigError(f"capture={mode!r}: choose one of {', '.join(CAPTURE_MODES)}")
    parameters, call = example_call(model, example_inputs)
    start = time.perf_counter()
    if mode == "export":
        return _export(model, call, parameters, dynamic, "capture='export' was asked for", start)
    try:
        captured = _symbolic(model, call, parameters, dynamic, leaf_modules, concrete_args)
    except TraceError as symbolic_error:
        if mode == "symbolic":
            raise
        why = f"symbolic tracing failed: {_first_line(symbolic_error)}"
        try:
            return _export(model, call, parameters, dynamic, why, start)
        except TraceError as export_error:
            raise TraceError(f"neither front end can capture {type(model).__name__}.\n"
                             f"symbolic tracing: {symbolic_error}\n"
                             f"torch.export: {export_error}") from export_error
    captured.seconds = time.perf_counter() - start
    return captured


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _symbolic(model: nn.Module, call: dict[str, Any], parameters: inspect.Signature, dynamic: DynamicSpec,
              leaf_modules: Sequence[str | type], concrete_args: dict[str, Any] | None) -> Captured:
    names = [p for p in parameters.parameters if p in call]
    positional = list(parameters.parameters)[:len(call)]
    if names != positional:
        raise TraceError(f"symbolic tracing takes the first forward arguments in order; example_inputs give "
                         f"{', '.join(call)} of forward({', '.join(parameters.parameters)})")
    inputs = tuple(call.values())
    traced = trace(model, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    contracts = [static_contract(name, value, _symbolic_axes(name, value, dynamic))
                 if isinstance(value, torch.Tensor) else None for name, value in call.items()]
    signature = CallSignature(parameters, None, list(inputs), contracts,
                              specialized=[c.describe() for c in contracts if c is not None])
    return Captured(traced.gm, inputs, signature, "symbolic", "symbolic tracing succeeded",
                    traced.leaf_modules, traced.bound_arguments)


def _symbolic_axes(name: str, value: torch.Tensor, dynamic: DynamicSpec) -> dict[int, str]:
    """Dims a symbolically traced input may vary in: the batch by default (passes specialize on the example's
    other sizes), the batch and sequence with dynamic=True, none with False, or the ones named."""
    if dynamic is False:
        return {}
    if dynamic is not None and dynamic is not True:
        return dict(dynamic.get(name, {}))  # names shared across inputs must agree: the user said so
    axes = default_axes(value) if dynamic is True else {0: "batch"} if value.dim() >= 1 else {}
    return {axis: f"{name}.{label}" for axis, label in axes.items()}  # inputs' batch dims are independent


def _export(model: nn.Module, call: dict[str, Any], parameters: inspect.Signature, dynamic: DynamicSpec,
            reason: str, start: float) -> Captured:
    try:
        result = export_model(model, call, parameters, dynamic)
    except Exception as exc:
        raise _export_error(model, exc) from exc
    leaves = pytree.tree_leaves(call)
    inputs = tuple(x for x in leaves if isinstance(x, torch.Tensor))
    captured = Captured(result.gm, inputs, result.signature, "export", reason)
    captured.seconds = time.perf_counter() - start
    return captured


def _export_error(model: nn.Module, exc: BaseException) -> TraceError:
    text = _first_line(exc)
    hint = "make data-dependent Python control flow tensor ops (torch.where, torch.cond), or pass " \
        "dynamic=False if a dynamic dimension is the problem"
    if "Cache" in str(exc) and "pytree" in str(exc):
        hint = "the model returns a key/value cache that export cannot flatten: pass use_cache=False " \
            "(example_inputs={..., 'use_cache': False}) or set model.config.use_cache = False"
    return TraceError(f"cannot export {type(model).__name__}: {type(exc).__name__}: {text}\n"
                      f"  at {user_frame(exc)}\n  Try: {hint}")

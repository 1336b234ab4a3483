"""Tracing a model into a torch.fx GraphModule, forgivingly.

- Non-tensor ``forward`` parameters that have defaults (``return_features=False``) and receive no example
  input are bound to their defaults, so ``if flag:`` in forward does not break tracing.
- ``a += b`` on a tensor is recorded as the in-place ``operator.iadd`` it is (plain torch.fx records an
  out-of-place add, losing the mutation); ``normalize-inplace`` later drops the mutation where nobody sees it.
- A submodule whose forward cannot be traced becomes a leaf (an opaque ``call_module``) and tracing is
  retried; the reasons are returned for the report.
- Only when the failing code is in the root module's own forward is a ``TraceError`` raised, naming the
  file and line of the failing statement and the options that can help.
"""

from __future__ import annotations

import inspect
import os
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxforge.errors import ConfigError, TraceError, suggest
from fxforge.graph.meta import fxmeta
from fxforge.graph.ops import INPLACE_OPERATORS

# Frames in these folders are not the user's code: error locations skip them.
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


@dataclass
class TraceResult:
    gm: fx.GraphModule
    leaf_modules: dict[str, str] = field(default_factory=dict)
    bound_arguments: dict[str, Any] = field(default_factory=dict)


class _InPlaceProxy(fx.Proxy):
    """A Proxy that records ``a += b`` (and every other augmented assignment) as ``operator.iadd`` etc.

    torch.fx's Proxy has no ``__iadd__``, so Python falls back to ``a = a + b`` and the mutation is lost:
    other names for ``a`` (and a caller's input tensor) would no longer see it.
    """


def _record_inplace(op: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _dunder, _op in INPLACE_OPERATORS.items():
    setattr(_InPlaceProxy, _dunder, _record_inplace(_op))


class _FallbackTracer(fx.Tracer):
    """A tracer that treats chosen module paths as leaves and remembers where tracing failed."""

    def __init__(self, leaf_paths: set[str] | None = None, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()  # no required arguments: unpickling a GraphModule re-creates its tracer class
        self.leaf_paths = leaf_paths or set()
        self.leaf_types = leaf_types
        self.active: list[str] = []
        self.failed_in: str | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaf_paths
            or isinstance(m, self.leaf_types)
            or type(m).__module__.startswith("fxforge.")  # our runtime modules (fused, fake-quant) stay whole
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self.active.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module first: the exception unwinds outwards
                self.failed_in = path
            raise
        finally:
            self.active.pop()


def bind_default_arguments(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """forward parameters past the example inputs that have non-tensor defaults -> those defaults."""
    params = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    positional = [p for p in params if p.kind != p.KEYWORD_ONLY]
    if n_inputs > len(positional) and not any(
        p.kind == p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values()
    ):
        raise ConfigError(
            f"example_inputs has {n_inputs} values but {type(model).__name__}.forward takes "
            f"{len(positional)} positional arguments ({', '.join(p.name for p in positional)}); "
            f"pass one value per argument, and a list argument as a single value: example_inputs=([t1, t2],)"
        )
    bound = {}
    for p in params[n_inputs:]:
        if p.default is inspect.Parameter.empty:
            raise ConfigError(
                f"{type(model).__name__}.forward needs argument '{p.name}' but example_inputs has only "
                f"{n_inputs} value(s): pass a tuple with one example per forward argument"
            )
        if not isinstance(p.default, torch.Tensor):
            bound[p.name] = p.default
    return bound


def user_frame(exc: BaseException) -> str:
    """'file:line: code' of the innermost traceback frame outside torch and fxforge."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_LIBRARY_DIRS)]
    if not frames:
        return "<inside torch>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _drop_string_annotations(graph: fx.Graph) -> None:
    """Forget type annotations written as strings (``from __future__ import annotations`` in the model's file): torch
    2.13's code generation makes them globals of ``forward`` that pickling the GraphModule (``torch.save``) cannot
    name. They document ``forward``; nothing reads them."""
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    leaf_modules: Sequence[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> TraceResult:
    """Trace ``model`` (not modified) into a GraphModule whose submodules are the model's own objects."""
    bound = bind_default_arguments(model, len(example_inputs))
    bound.update(concrete_args or {})
    leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
    _check_module_paths(model, leaf_paths)
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    reasons: dict[str, str] = {}
    while True:
        tracer = _FallbackTracer(leaf_paths, leaf_types)
        try:
            graph = tracer.trace(model, concrete_args=bound or None)
            break
        except Exception as exc:
            path = tracer.failed_in
            if not path or path in leaf_paths:
                raise _trace_error(model, exc, reasons) from exc
            leaf_paths.add(path)
            reasons[path] = f"{_first_line(exc)} at {user_frame(exc)}"
    _default_placeholders_to_bound_values(graph, bound)
    _drop_string_annotations(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(model.training)  # the intermediate containers GraphModule creates start in training mode
    return TraceResult(gm, reasons, bound)


def _check_module_paths(model: nn.Module, paths: set[str]) -> None:
    known = {name for name, _ in model.named_modules()}
    for path in sorted(paths - known):
        raise ConfigError(f"leaf_modules: {type(model).__name__} has no submodule '{path}'.{suggest(path, known)}")


def _default_placeholders_to_bound_values(graph: fx.Graph, bound: dict[str, Any]) -> None:
    """fx keeps the signature default on a specialized placeholder; make it the value traced with (and mark
    it ``bound``: it is not one of the inputs that calibration data supplies)."""
    for node in graph.nodes:
        name = next((k for k in bound if re.fullmatch(rf"{re.escape(k)}(_\d+)?", str(node.target))), None)
        if node.op == "placeholder" and name is not None:
            node.args = (bound[name],)
            fxmeta(node)["bound"] = True


def _trace_error(model: nn.Module, exc: BaseException, reasons: dict[str, str]) -> TraceError:
    leaves = f" (already kept as leaves: {', '.join(reasons)})" if reasons else ""
    return TraceError(
        f"cannot trace {type(model).__name__}: {_first_line(exc)}\n"
        f"  at {user_frame(exc)}\n"
        f"The failing statement is in the model's own forward{leaves}, so no submodule can be kept as a leaf "
        f"instead. Options: concrete_args={{'name': value}} to fix a non-tensor argument, "
        f"leaf_modules=['path.to.submodule'] to keep code opaque, or replace data-dependent Python control "
        f"flow on tensors with tensor ops (torch.where)."
    )

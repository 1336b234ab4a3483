"""Spellings: the many ways a graph writes one op, and one normal form for a call's arguments.

``canonical_op(node)`` names the op a call computes, whatever its spelling: ``torch.relu(x)``,
``F.relu(x)``, ``x.relu()``, ``nn.ReLU()`` and ``aten.relu`` (graphs from make_fx / torch.export) are all
``("relu", (x,))``. In-place forms are ops of their own (``relu_``: ``torch.relu_``, ``F.relu(x,
inplace=True)``, ``nn.ReLU(inplace=True)``; ``add_``: ``x += y``, ``x.add_(y)``), because replacing one by
the other is only correct when nobody sees the mutation. Calls with extra arguments (``torch.add(x, y,
alpha=2)``) are not canonical. ``call_operands(node)`` binds any other call's arguments to its signature, so
positional and keyword spellings compare equal. fxforge.patterns matches through both.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_aten = torch.ops.aten

# Canonical op -> the functions, methods and module types that compute it. "op_" is in-place.
_FUNCTION_OPS: dict[Any, str] = {}
_METHOD_OPS: dict[str, str] = {}
MODULE_OPS: dict[type, str] = {}
REPRESENTATIVE: dict[str, Any] = {}  # op -> one function spelling (what a module in a pattern stands for)


def _spell(op: str, functions: Sequence[Any] = (), methods: Sequence[str] = (), modules: Sequence[type] = ()):
    _FUNCTION_OPS.update(dict.fromkeys(functions, op))
    _METHOD_OPS.update(dict.fromkeys(methods, op))
    MODULE_OPS.update(dict.fromkeys(modules, op))
    REPRESENTATIVE.setdefault(op, functions[0])


_spell("relu", [torch.relu, F.relu, _aten.relu.default], ["relu"], [nn.ReLU])
_spell("relu_", [torch.relu_, _aten.relu_.default], ["relu_"])
_spell("relu6", [F.relu6], [], [nn.ReLU6])
_spell("sigmoid", [torch.sigmoid, F.sigmoid, _aten.sigmoid.default], ["sigmoid"], [nn.Sigmoid])
_spell("sigmoid_", [torch.sigmoid_, _aten.sigmoid_.default], ["sigmoid_"])
_spell("tanh", [torch.tanh, F.tanh, _aten.tanh.default], ["tanh"], [nn.Tanh])
_spell("tanh_", [torch.tanh_, _aten.tanh_.default], ["tanh_"])
_spell("silu", [F.silu, _aten.silu.default], [], [nn.SiLU])
_spell("silu_", [_aten.silu_.default])
_spell("hardswish", [F.hardswish, _aten.hardswish.default], [], [nn.Hardswish])
_spell("hardswish_", [_aten.hardswish_.default])
_spell("hardsigmoid", [F.hardsigmoid, _aten.hardsigmoid.default], [], [nn.Hardsigmoid])
_spell("hardsigmoid_", [_aten.hardsigmoid_.default])
_spell("add", [operator.add, torch.add, _aten.add.Tensor], ["add"])
_spell("add_", [operator.iadd, _aten.add_.Tensor], ["add_"])
_spell("sub", [operator.sub, torch.sub, _aten.sub.Tensor], ["sub"])
_spell("sub_", [operator.isub, _aten.sub_.Tensor], ["sub_"])
_spell("mul", [operator.mul, torch.mul, _aten.mul.Tensor], ["mul"])
_spell("mul_", [operator.imul, _aten.mul_.Tensor], ["mul_"])
_spell("div", [operator.truediv, torch.div, _aten.div.Tensor], ["div"])
_spell("div_", [operator.itruediv, _aten.div_.Tensor], ["div_"])

# Augmented assignments on tensors: ``a += b`` calls ``a.__iadd__(b)``, which mutates ``a``.
INPLACE_OPERATORS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
    "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}

_BINARY = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
COMMUTATIVE = {"add", "mul"}
# F.relu(x, inplace=True) and friends: the flag (2nd argument) picks the in-place op
_INPLACE_FLAG = {F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid}


def _lookup(table: Mapping[Any, str], key: Any) -> str | None:
    try:
        return table.get(key)
    except TypeError:  # an unhashable target
        return None


def submodule(node: fx.Node) -> nn.Module:
    """The module a call_module node calls."""
    return node.graph.owning_module.get_submodule(str(node.target))


def _spelling(node: fx.Node, module_of: Callable[[fx.Node], nn.Module]) -> tuple[str | None, tuple, dict]:
    """(canonical op or None, args, kwargs) of a call, with a module's or F.*'s in-place flag folded in."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_method":
        return _METHOD_OPS.get(str(node.target)), args, kwargs
    if node.op == "call_module":
        mod = module_of(node)
        op = MODULE_OPS.get(type(mod))
        return (op + "_" if op and getattr(mod, "inplace", False) else op), args, kwargs
    op = _lookup(_FUNCTION_OPS, node.target) if node.op == "call_function" else None
    if op and node.target in _INPLACE_FLAG:
        kwargs = dict(kwargs)
        inplace = kwargs.pop("inplace", args[1] if len(args) > 1 else False)
        args = args[:1]
        op = op + "_" if inplace is True else op if inplace is False else None
    return op, args, kwargs


def canonical_op(node: fx.Node, module_of: Callable[[fx.Node], nn.Module] = submodule) -> tuple[str, tuple] | None:
    """``("relu", (x,))`` for any spelling of relu (and the other ops of the spelling table), else None."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    op, args, kwargs = _spelling(node, module_of)
    if op is None or kwargs or len(args) != (2 if op.rstrip("_") in _BINARY else 1):
        return None
    return op, tuple(args)


@functools.cache
def _signature(target: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def call_operands(node: fx.Node) -> tuple:
    """A call's arguments in one normal form: bound to the function's signature with defaults applied when
    it has one (so ``f(x, 0.5)`` and ``f(x, p=0.5)`` agree), else positional then sorted keywords."""
    try:
        sig = _signature(node.target) if node.op == "call_function" else None
    except TypeError:  # unhashable target
        sig = None
    if sig is not None:
        try:
            bound = sig.bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            return tuple(bound.arguments.values())
        except TypeError:
            pass
    return (*node.args, *sorted(node.kwargs.items()))

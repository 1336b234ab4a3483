"""The op table: every spelling of each op fxforge knows by name, and one normal form for a call's arguments.

An op has one name (``"relu"``) and many spellings: functions (``torch.relu``, ``F.relu``, ``operator.add``),
Tensor methods (``x.relu()``), module types (``nn.ReLU``) and aten overloads (graphs from make_fx /
torch.export). ``op_name(node)`` names the op a call computes, whatever its spelling, else None; passes,
quantization, to-nhwc and the lowerings keep their categories (which ops fuse, run on int8, keep a layout) as
sets of these names. Module types match exactly: a subclass may compute something else. aten overloads are
listed where their arguments read like the function's.
In-place forms are ops of their own (``relu_``: ``torch.relu_``, ``F.relu(x, inplace=True)``,
``nn.ReLU(inplace=True)``; ``add_``: ``x += y``, ``x.add_(y)``), because replacing one by the other is only
correct when nobody sees the mutation; ``out_of_place("relu_") == "relu"``.
``canonical_op(node)`` is ``("relu", (x,))`` for the ops that take tensors only (the CANONICAL ones, which
patterns match in any spelling); calls with extra arguments (``torch.add(x, y, alpha=2)``) are not canonical.
``call_operands(node)`` binds any other call's arguments to its signature, so positional and keyword
spellings compare equal. fxforge.patterns matches through both.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_aten = torch.ops.aten


@dataclass(frozen=True)
class Spellings:
    """The ways a graph writes one op (an in-place op is also spelled by its out-of-place functions' and
    modules' ``inplace`` flag)."""

    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    modules: tuple[type, ...] = ()
    aten: tuple[Any, ...] = ()


TABLE: dict[str, Spellings] = {}
_FUNCTION_OPS: dict[Any, str] = {}  # functions and aten overloads (call_function targets) -> op
_METHOD_OPS: dict[str, str] = {}
_MODULE_OPS: dict[type, str] = {}
_INPLACE_FLAG: dict[Any, int] = {}  # function -> position of its ``inplace`` parameter


def _flag_position(function: Any) -> int | None:
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    return names.index("inplace") if "inplace" in names else None


def _has_inplace_flag(module_type: type) -> bool:
    return "inplace" in inspect.signature(module_type).parameters


def _op(name: str, functions: Sequence[Any] = (), methods: Sequence[str] = (), modules: Sequence[type] = (),
        aten: Sequence[Any] = ()) -> None:
    """Register op ``name``; when a function or module spells it with an ``inplace`` flag, ``name_`` too."""
    TABLE[name] = Spellings(tuple(functions), tuple(methods), tuple(modules), tuple(aten))
    _FUNCTION_OPS.update(dict.fromkeys((*functions, *aten), name))
    _METHOD_OPS.update(dict.fromkeys(methods, name))
    _MODULE_OPS.update(dict.fromkeys(modules, name))
    flags = {f: p for f in functions if (p := _flag_position(f)) is not None}
    _INPLACE_FLAG.update(flags)
    if flags or any(map(_has_inplace_flag, modules)):
        TABLE.setdefault(name + "_", Spellings())


# activations
_op("relu", [torch.relu, F.relu], ["relu"], [nn.ReLU], [_aten.relu.default])
_op("relu_", [torch.relu_], ["relu_"], aten=[_aten.relu_.default])
_op("relu6", [F.relu6], [], [nn.ReLU6])
_op("hardtanh", [F.hardtanh], [], [nn.Hardtanh], [_aten.hardtanh.default])
_op("hardtanh_", [F.hardtanh_], aten=[_aten.hardtanh_.default])
_op("clamp", [torch.clamp], ["clamp"], aten=[_aten.clamp.default])
_op("clamp_", [torch.clamp_], ["clamp_"], aten=[_aten.clamp_.default])
_op("sigmoid", [torch.sigmoid, F.sigmoid], ["sigmoid"], [nn.Sigmoid], [_aten.sigmoid.default])
_op("sigmoid_", [torch.sigmoid_], ["sigmoid_"], aten=[_aten.sigmoid_.default])
_op("tanh", [torch.tanh, F.tanh], ["tanh"], [nn.Tanh], [_aten.tanh.default])
_op("tanh_", [torch.tanh_], ["tanh_"], aten=[_aten.tanh_.default])
_op("silu", [F.silu], [], [nn.SiLU], [_aten.silu.default])
_op("silu_", aten=[_aten.silu_.default])
_op("hardswish", [F.hardswish], [], [nn.Hardswish], [_aten.hardswish.default])
_op("hardswish_", aten=[_aten.hardswish_.default])
_op("hardsigmoid", [F.hardsigmoid], [], [nn.Hardsigmoid], [_aten.hardsigmoid.default])
_op("hardsigmoid_", aten=[_aten.hardsigmoid_.default])
_op("gelu", [F.gelu], [], [nn.GELU], [_aten.gelu.default])
_op("leaky_relu", [F.leaky_relu], [], [nn.LeakyReLU], [_aten.leaky_relu.default])
_op("leaky_relu_", [F.leaky_relu_], aten=[_aten.leaky_relu_.default])
_op("elu", [F.elu], [], [nn.ELU])
_op("elu_", [F.elu_])
_op("softmax", [F.softmax, torch.softmax], ["softmax"], aten=[_aten.softmax.int])
# arithmetic
_op("add", [operator.add, torch.add], ["add"], aten=[_aten.add.Tensor])
_op("add_", [operator.iadd], ["add_"], aten=[_aten.add_.Tensor])
_op("sub", [operator.sub, torch.sub], ["sub"], aten=[_aten.sub.Tensor])
_op("sub_", [operator.isub], ["sub_"], aten=[_aten.sub_.Tensor])
_op("mul", [operator.mul, torch.mul], ["mul"], aten=[_aten.mul.Tensor])
_op("mul_", [operator.imul], ["mul_"], aten=[_aten.mul_.Tensor])
_op("div", [operator.truediv, torch.div], ["div"], aten=[_aten.div.Tensor])
_op("div_", [operator.itruediv], ["div_"], aten=[_aten.div_.Tensor])
_op("pow", [operator.pow, torch.pow], ["pow"], aten=[_aten.pow.Tensor_Scalar, _aten.pow.Tensor_Tensor])
_op("matmul", [operator.matmul, torch.matmul], ["matmul"], aten=[_aten.matmul.default])
_op("bmm", [torch.bmm], ["bmm"], aten=[_aten.bmm.default])
_op("baddbmm", [torch.baddbmm], ["baddbmm"], aten=[_aten.baddbmm.default])
_op("addmm", [torch.addmm], ["addmm"], aten=[_aten.addmm.default])
# layers
_op("conv1d", [F.conv1d], [], [nn.Conv1d])
_op("conv2d", [F.conv2d], [], [nn.Conv2d])  # F.conv2d is torch.conv2d
_op("conv3d", [F.conv3d], [], [nn.Conv3d])
_op("conv_transpose1d", [F.conv_transpose1d], [], [nn.ConvTranspose1d])
_op("conv_transpose2d", [F.conv_transpose2d], [], [nn.ConvTranspose2d])
_op("conv_transpose3d", [F.conv_transpose3d], [], [nn.ConvTranspose3d])
_op("linear", [F.linear], [], [nn.Linear], [_aten.linear.default])
_op("batch_norm", [F.batch_norm], [], [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
_op("layer_norm", [F.layer_norm], [], [nn.LayerNorm], [_aten.layer_norm.default])
_op("group_norm", [F.group_norm], [], [nn.GroupNorm])
# pooling, resampling
_op("max_pool1d", [F.max_pool1d, torch.max_pool1d], [], [nn.MaxPool1d])
_op("max_pool2d", [F.max_pool2d, torch.max_pool2d], [], [nn.MaxPool2d])
_op("max_pool3d", [F.max_pool3d, torch.max_pool3d], [], [nn.MaxPool3d])
_op("avg_pool1d", [F.avg_pool1d], [], [nn.AvgPool1d])
_op("avg_pool2d", [F.avg_pool2d], [], [nn.AvgPool2d])
_op("avg_pool3d", [F.avg_pool3d], [], [nn.AvgPool3d])
_op("adaptive_avg_pool1d", [F.adaptive_avg_pool1d], [], [nn.AdaptiveAvgPool1d])
_op("adaptive_avg_pool2d", [F.adaptive_avg_pool2d], [], [nn.AdaptiveAvgPool2d])
_op("adaptive_avg_pool3d", [F.adaptive_avg_pool3d], [], [nn.AdaptiveAvgPool3d])
_op("adaptive_max_pool1d", [F.adaptive_max_pool1d], [], [nn.AdaptiveMaxPool1d])
_op("adaptive_max_pool2d", [F.adaptive_max_pool2d], [], [nn.AdaptiveMaxPool2d])
_op("adaptive_max_pool3d", [F.adaptive_max_pool3d], [], [nn.AdaptiveMaxPool3d])
_op("interpolate", [F.interpolate], [], [nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d])
_op("pad", [F.pad])
# reductions
_op("mean", [torch.mean], ["mean"], aten=[_aten.mean.dim])
_op("sum", [torch.sum], ["sum"], aten=[_aten.sum.dim_IntList])
_op("amax", [torch.amax], ["amax"])
_op("amin", [torch.amin], ["amin"])
# shapes, views, copies
_op("cat", [torch.cat, torch.concat], aten=[_aten.cat.default])
_op("flatten", [torch.flatten], ["flatten"], [nn.Flatten], [_aten.flatten.using_ints])
_op("unflatten", [torch.unflatten], ["unflatten"], [nn.Unflatten])
_op("view", [], ["view"], aten=[_aten.view.default])
_op("reshape", [torch.reshape], ["reshape"], aten=[_aten.reshape.default])
_op("permute", [torch.permute], ["permute"], aten=[_aten.permute.default])
_op("transpose", [torch.transpose], ["transpose"], aten=[_aten.transpose.int])
_op("squeeze", [torch.squeeze], ["squeeze"], aten=[_aten.squeeze.dim])
_op("unsqueeze", [torch.unsqueeze], ["unsqueeze"], aten=[_aten.unsqueeze.default])
_op("contiguous", [], ["contiguous"])
_op("getitem", [operator.getitem])
_op("embedding", [F.embedding], [], [nn.Embedding], [_aten.embedding.default])
_op("scaled_dot_product_attention", [F.scaled_dot_product_attention], [],
    aten=[_aten.scaled_dot_product_attention.default])
# attribute and metadata reads
_op("getattr", [getattr])
_op("size", [], ["size"])
_op("dim", [], ["dim"])
_op("numel", [torch.numel], ["numel"])
# no-ops in eval mode
_op("identity", [], [], [nn.Identity])
_op("dropout", [F.dropout, torch.dropout], [], [nn.Dropout], [_aten.dropout.default])
_op("dropout1d", [F.dropout1d], [], [nn.Dropout1d])
_op("dropout2d", [F.dropout2d], [], [nn.Dropout2d])
_op("dropout3d", [F.dropout3d], [], [nn.Dropout3d])
_op("alpha_dropout", [F.alpha_dropout], [], [nn.AlphaDropout])
_op("feature_alpha_dropout", [F.feature_alpha_dropout], [], [nn.FeatureAlphaDropout])

# computes a function of its tensor operands alone, the same in every spelling: canonical_op (patterns) knows it
CANONICAL = frozenset({"relu", "relu6", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid",
                       "add", "sub", "mul", "div"})
CANONICAL |= {op + "_" for op in CANONICAL if op + "_" in TABLE}
# a op b, elementwise with broadcasting
BINARY = frozenset({"add", "sub", "mul", "div"})
# a op b == b op a
COMMUTATIVE = frozenset({"add", "mul"})
# a canonical op -> one call_function spelling (what a module in a pattern stands for)
REPRESENTATIVE: dict[str, Any] = {op: (TABLE[op].functions or TABLE[op].aten)[0] for op in sorted(CANONICAL)
                                  if TABLE[op].functions or TABLE[op].aten}
# activations fusion passes absorb into a conv / linear: name -> the eager function (the fused modules' semantics)
ACTIVATIONS = {op: REPRESENTATIVE[op] for op in ("relu", "relu6", "hardswish", "silu")}

# Augmented assignments on tensors: ``a += b`` calls ``a.__iadd__(b)``, which mutates ``a``.
INPLACE_OPERATORS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
    "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}


def spellings(op: str) -> Spellings:
    """The functions, methods, module types and aten overloads that spell ``op``."""
    return TABLE[op]


def out_of_place(op: str) -> str:
    """The op an in-place op is the mutating form of (``"relu_"`` -> ``"relu"``); other ops unchanged."""
    base = op.removesuffix("_")
    return base if base != op and base in TABLE else op


def _lookup(table: Mapping[Any, str], key: Any) -> str | None:
    try:
        return table.get(key)
    except TypeError:  # an unhashable target
        return None


def submodule(node: fx.Node) -> nn.Module:
    """The module a call_module node calls."""
    return node.graph.owning_module.get_submodule(str(node.target))


def module_op(module: nn.Module) -> str | None:
    """The op a module computes when called (``"relu_"`` for ``nn.ReLU(inplace=True)``), else None."""
    op = _MODULE_OPS.get(type(module))
    return op + "_" if op and getattr(module, "inplace", False) and op + "_" in TABLE else op


def _spelling(node: fx.Node, module_of: Callable[[fx.Node], nn.Module]) -> tuple[str | None, tuple, dict]:
    """(op or None, args, kwargs) of a call, with a module's or a function's in-place flag folded in (the
    flag dropped from the arguments)."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_method":
        return _METHOD_OPS.get(str(node.target)), args, kwargs
    if node.op == "call_module":
        return module_op(module_of(node)), args, kwargs
    op = _lookup(_FUNCTION_OPS, node.target) if node.op == "call_function" else None
    position = _INPLACE_FLAG.get(node.target) if op else None
    if position is not None:
        kwargs = dict(kwargs)
        inplace = kwargs.pop("inplace", args[position] if len(args) > position else False)
        args = args[:position]
        op = op + "_" if inplace is True else op if inplace is False else None
    return op, args, kwargs


def op_name(node: fx.Node, module_of: Callable[[fx.Node], nn.Module] = submodule) -> str | None:
    """The op ``node`` computes, in any spelling (``"relu"``, or ``"relu_"`` for its in-place forms), else
    None (unknown ops, placeholders, get_attr, output; an ``inplace`` flag that is not a constant)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    return _spelling(node, module_of)[0]


def canonical_op(node: fx.Node, module_of: Callable[[fx.Node], nn.Module] = submodule) -> tuple[str, tuple] | None:
    """``("relu", (x,))`` for any spelling of a CANONICAL op called on its tensor operands alone, else None."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    op, args, kwargs = _spelling(node, module_of)
    if op not in CANONICAL or kwargs or len(args) != (2 if out_of_place(op) in BINARY else 1):
        return None
    return op, tuple(args)


def _constant(value: Any) -> float | None:
    return float(value) if isinstance(value, Real) and not isinstance(value, bool) else None


def hardtanh_bounds(node: fx.Node, module_of: Callable[[fx.Node], nn.Module] = submodule) -> tuple[float, float] | None:
    """(min, max) of a relu6 or hardtanh call (in place or not) when they are constants, else None."""
    op = out_of_place(op_name(node, module_of) or "")
    if op == "relu6":
        return 0.0, 6.0
    if op != "hardtanh":
        return None
    if node.op == "call_module":
        module = module_of(node)
        bounds = module.min_val, module.max_val
    else:  # F.hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False) and aten.hardtanh(x, min_val, max_val)
        bounds = (node.kwargs.get(name, node.args[i] if len(node.args) > i else default)
                  for i, name, default in ((1, "min_val", -1.0), (2, "max_val", 1.0)))
    low, high = map(_constant, bounds)
    return None if low is None or high is None else (low, high)


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

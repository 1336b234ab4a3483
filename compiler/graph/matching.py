"""Small matching helpers shared by the built-in passes (node kinds, module lookup, safe replacement)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .ops import INPLACE_OPERATORS


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def calls_module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    return isinstance(module_of(gm, node), types)


def call_count(gm: fx.GraphModule, target: str) -> int:
    """How many call_module nodes call the submodule at ``target`` (shared modules are called > 1 times)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def sole_user(node: fx.Node) -> fx.Node | None:
    """The only user of ``node``, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Any spelling of relu: nn.ReLU, F.relu, torch.relu(_), Tensor.relu(_)."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, F.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


# Activations that fusion passes absorb: name -> the eager function (the fused modules' reference semantics).
ACTIVATIONS = {
    "relu": torch.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "silu": F.silu,
}
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS = {F.relu6: "relu6", F.hardswish: "hardswish", F.silu: "silu"}  # relu: is_relu


def _is_relu6_hardtanh(gm: fx.GraphModule, node: fx.Node) -> bool:
    """nn.Hardtanh(0, 6) / F.hardtanh(x, 0, 6): relu6 under another name."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.Hardtanh):
        return (mod.min_val, mod.max_val) == (0.0, 6.0)
    if node.op == "call_function" and node.target is F.hardtanh:
        bounds = (*node.args[1:3], node.kwargs.get("min_val"), node.kwargs.get("max_val"))
        return [b for b in bounds if b is not None] == [0.0, 6.0]
    return False


def activation_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The ACTIVATIONS name ``node`` computes (any spelling, in-place or not), else None."""
    if is_relu(gm, node):
        return "relu"
    if _is_relu6_hardtanh(gm, node):
        return "relu6"
    mod = module_of(gm, node)
    if mod is not None:
        return _ACTIVATION_MODULES.get(type(mod))
    if node.op == "call_function" and len(node.args) == 1:
        return _ACTIVATION_FUNCTIONS.get(node.target)
    return None


def is_out_of_place_add(node: fx.Node) -> bool:
    """``a + b`` with two tensor operands and no alpha (operator.add, torch.add, Tensor.add)."""
    fn_add = node.op == "call_function" and node.target in (operator.add, torch.add)
    method_add = node.op == "call_method" and node.target == "add"
    if not (fn_add or method_add) or len(node.args) != 2 or node.kwargs:
        return False
    return all(isinstance(a, fx.Node) for a in node.args)


def replace_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at path ``target`` (keeps the original module path for reports and diffs).

    New modules start in training mode; they take the graph's mode so the ``eval`` property keeps holding.
    """
    gm.add_submodule(target, module.train(gm.training))


_INPLACE_OPERATORS = {*INPLACE_OPERATORS.values(), operator.setitem}


def is_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for ops that mutate their first argument (``x.add_(y)``, ``x += y``, ``relu_``, ``inplace=True``)."""
    if node.kwargs.get("inplace", False):
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_module":
        return bool(getattr(module_of(gm, node), "inplace", False))
    return False


def is_opaque_module_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call of a module that is neither torch.nn's nor fxforge's (e.g. a leaf the tracer could not enter):
    we cannot see what it does, so it may mutate its inputs or have other effects."""
    mod = module_of(gm, node)
    return mod is not None and not type(mod).__module__.startswith(("torch.nn.", "fxforge."))


def has_side_effects(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when removing ``node`` could change what the program does, even with no users."""
    return (node.op in ("placeholder", "output") or node.is_impure() or is_in_place(gm, node)
            or is_opaque_module_call(gm, node))


FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
                  nn.GroupNorm, nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid)
FRESH_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul,
                    torch.sub, torch.cat, torch.relu, F.relu, torch.sigmoid, F.conv2d, F.linear,
                    F.batch_norm, F.hardswish, F.silu, F.gelu}
FRESH_METHODS = {"add", "mul", "sub", "div", "relu", "sigmoid"}

def is_fresh(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node`` produces a newly allocated tensor that aliases nothing else."""
    if node.op == "call_module":
        mod = module_of(gm, node)
        return isinstance(mod, (*FRESH_MODULES, nn.ReLU)) and not getattr(mod, "inplace", False)
    if node.op == "call_function":
        return node.target in FRESH_FUNCTIONS and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target in FRESH_METHODS


def mutates_only_private_value(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for an in-place op whose mutated value is read by nothing else: the mutation is unobservable,
    so the op may become out-of-place (normalize-inplace) or, if unused, disappear (dce).

    The mutated value may itself be the result of in-place ops (``y += a; y += b``): those return their
    first argument, so the chain is followed down to the fresh tensor it aliases, and every link must have
    a single reader.
    """
    if not is_in_place(gm, node):
        return False
    mutated = node.args[0] if node.args else None
    while isinstance(mutated, fx.Node) and len(mutated.users) == 1:
        if is_fresh(gm, mutated):
            return True
        if not is_in_place(gm, mutated):
            return False
        mutated = mutated.args[0]
    return False


def mutation_between(first: fx.Node, last: fx.Node, gm: fx.GraphModule) -> bool:
    """True when a node strictly between ``first`` and ``last`` (graph order) has side effects.

    Moving a computation from ``first`` down to ``last`` is only safe when nothing in between can have
    mutated what it reads.
    """
    node = first.next
    while node is not last:
        if has_side_effects(gm, node):
            return True
        node = node.next
    return False

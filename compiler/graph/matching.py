"""Small matching helpers shared by the built-in passes (node kinds, module lookup, safe replacement)."""

from __future__ import annotations

import operator
from functools import partial

from torch import fx, nn

from .ops import ACTIVATIONS, INPLACE_OPERATORS, hardtanh_bounds, op_name, out_of_place


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


def _op(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op-table name of what ``node`` computes (modules looked up in ``gm``), else None."""
    return op_name(node, partial(module_of, gm))


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Any spelling of relu, in place or not: nn.ReLU, F.relu, torch.relu(_), Tensor.relu(_), aten.relu(_)."""
    return out_of_place(_op(gm, node) or "") == "relu"


def activation_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The ACTIVATIONS name ``node`` computes (any spelling, in-place or not; hardtanh(0, 6) is relu6), else None."""
    op = out_of_place(_op(gm, node) or "")
    if op == "hardtanh" and hardtanh_bounds(node, partial(module_of, gm)) == (0.0, 6.0):
        return "relu6"
    return op if op in ACTIVATIONS else None


def is_out_of_place_add(node: fx.Node) -> bool:
    """``a + b`` with two tensor operands and no alpha (operator.add, torch.add, Tensor.add, aten.add)."""
    if node.op == "call_module" or op_name(node) != "add" or len(node.args) != 2 or node.kwargs:
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


# ops that return a newly allocated tensor, never a view of an input (in-place forms are other ops)
FRESH = frozenset({"add", "sub", "mul", "div", "cat", "relu", "sigmoid", "hardswish", "silu", "gelu", "conv1d",
                   "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
                   "batch_norm", "layer_norm", "group_norm"})


def is_fresh(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node`` produces a newly allocated tensor that aliases nothing else."""
    return _op(gm, node) in FRESH


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

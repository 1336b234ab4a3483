"""Small matching helpers shared by the built-in passes (node kinds, module lookup, safe replacement)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


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

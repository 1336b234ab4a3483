"""normalize-inplace: turn in-place ops on fresh, single-use values into their out-of-place forms.

Rewrites: ``operator.iadd/isub/imul/itruediv`` (``+=`` ...), ``Tensor.add_/mul_/sub_/relu_``, ``torch.relu_``,
``F.relu(inplace=True)`` and ``nn.ReLU(inplace=True)`` calls -> ``operator.add/sub/mul/truediv`` and ``torch.relu``.
Why correct: an in-place op is observable only through other references to the tensor it mutates. When
the mutated value is produced by an op that returns a *new* tensor (conv, linear, batch norm, arithmetic,
...) and the in-place op is its only user, nothing else can see the mutation, so the out-of-place form
computes the same values. Everything else (placeholders, views, shared values) is left alone.
Preconditions: none (uses dtypes from shape metadata when present: an op whose out-of-place form would
promote the dtype, or whose operand dtypes are unknown, is left alone).

Before: ``b = bn(x); b += y; r = relu_(b)``   After: ``b = bn(x); s = b + y; r = torch.relu(s)``
This lets later passes match ``conv -> add -> relu`` without reasoning about aliasing.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.context import PassContext
from fxforge.meta import record_rewrite
from fxforge.pass_api import graph_pass

from .matching import module_of, mutates_only_private_value

# in-place target -> out-of-place replacement (call_function)
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                      operator.itruediv: operator.truediv,
                      torch.relu_: torch.relu}
_INPLACE_METHODS = {"add_": operator.add, "mul_": operator.mul, "sub_": operator.sub, "relu_": torch.relu}


def _out_of_place_target(gm: fx.GraphModule, node: fx.Node):  # -> replacement function or None
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        return _INPLACE_FUNCTIONS[node.target]
    if node.op == "call_function" and node.target is F.relu and node.kwargs.get("inplace", False):
        return torch.relu
    if node.op == "call_method" and node.target in _INPLACE_METHODS and not node.kwargs:
        return _INPLACE_METHODS[node.target]
    mod = module_of(gm, node)
    return torch.relu if isinstance(mod, nn.ReLU) and mod.inplace else None


def _dtype(value: object) -> torch.dtype | None:
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    return getattr(meta, "dtype", None)


def _would_promote(node: fx.Node) -> bool:
    """``y += z`` keeps y's dtype; ``y + z`` promotes (fp16 + fp32 -> fp32): only rewrite when dtypes agree."""
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
        return False  # unary, or a Python scalar operand: no tensor promotion
    mine, other = _dtype(node.args[0]), _dtype(node.args[1])
    return mine is None or mine != other


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> bool:
    target = _out_of_place_target(gm, node)
    mutated = node.args[0] if node.args else None
    if target is None or not isinstance(mutated, fx.Node):
        return False
    if not mutates_only_private_value(gm, node) or _would_promote(node):
        return False
    args = node.args[:2] if target is not torch.relu else node.args[:1]
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(target, tuple(args))
    node.replace_all_uses_with(new)
    record_rewrite(new, "normalize-inplace", node)
    gm.graph.erase_node(node)
    return True


@graph_pass(name="normalize-inplace")
def normalize_inplace(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """In-place ops whose mutation nobody can observe -> out-of-place ops."""
    count = sum(_rewrite(gm, node) for node in list(gm.graph.nodes))
    if count:
        gm.delete_all_unused_submodules()
        ctx.note(f"{count} in-place op(s) made out-of-place")
    return count > 0

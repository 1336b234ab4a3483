"""normalize-inplace: turn in-place ops on fresh, single-use values into their out-of-place forms.

Rewrites: ``operator.iadd/isub/imul/itruediv`` (``+=`` ...), ``Tensor.add_/mul_/sub_/div_/relu_``, ``torch.relu_``,
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

import torch
from torch import fx

from fxforge.graph import patterns as P
from fxforge.graph.matching import mutates_only_private_value
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass


def _dtype(value: object) -> torch.dtype | None:
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    return getattr(meta, "dtype", None)


def _would_promote(node: fx.Node) -> bool:
    """``y += z`` keeps y's dtype; ``y + z`` promotes (fp16 + fp32 -> fp32): only rewrite when dtypes agree."""
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
        return False  # unary, or a Python scalar operand: no tensor promotion
    mine, other = _dtype(node.args[0]), _dtype(node.args[1])
    return mine is None or mine != other


def _unobservable(m: P.Match) -> bool:
    """Nothing else reads the mutated value, and the out-of-place form keeps its dtype."""
    return (isinstance(m["x"], fx.Node) and mutates_only_private_value(m.gm, m.anchor)
            and not _would_promote(m.anchor))


RULES = [
    # x += y, x.add_(y) -> x + y
    P.Rule(lambda x, y: x.add_(y), lambda x, y: x + y, where=_unobservable),
    # x -= y, x.sub_(y) -> x - y
    P.Rule(lambda x, y: x.sub_(y), lambda x, y: x - y, where=_unobservable),
    # x *= y, x.mul_(y) -> x * y
    P.Rule(lambda x, y: x.mul_(y), lambda x, y: x * y, where=_unobservable),
    # x /= y, x.div_(y) -> x / y
    P.Rule(lambda x, y: x.div_(y), lambda x, y: x / y, where=_unobservable),
    # relu_(x), x.relu_(), F.relu(x, inplace=True), nn.ReLU(inplace=True) -> torch.relu(x)
    P.Rule(lambda x: torch.relu_(x), lambda x: torch.relu(x), where=_unobservable),
]


@graph_pass(name="normalize-inplace")
def normalize_inplace(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """In-place ops whose mutation nobody can observe -> out-of-place ops."""
    result = P.rewrite(gm, RULES, ctx)
    if result.modified:
        ctx.note(f"{sum(result.matches.values())} in-place op(s) made out-of-place")
    return result

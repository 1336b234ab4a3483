"""fuse-conv, fuse-linear: merge a conv/linear with the elementwise ops that follow it into one module.

Rewrites (each a rule, tried in this order, first match wins per conv):
    conv(x) + other -> relu   =>  FusedConv[add+relu](x, other)     # residual block tail
    conv(x) + other           =>  FusedConv[add](x, other)
    conv(x) -> relu           =>  FusedConv[relu](x)
    linear(x) -> relu         =>  FusedLinear[relu](x)
Why correct: the fused module runs exactly the original ops in the original order (its eager forward is
the reference semantics); backends then lower it to one fused kernel (oneDNN post-ops on "cpu").
Only intermediate values with a single user are absorbed, so no other node needed them; ``other`` must
have the conv output's shape (no broadcasting), which is what the fused kernels accept.
Preconditions: BN folded first (``bn-folded``), otherwise ``conv -> bn -> relu`` has nothing to fuse;
in-place ops normalized, so ``+=`` appears as ``operator.add``.

Before: ``y = relu(conv(x) + identity)``   After: ``y = fused_conv(x, identity)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fxforge.context import PassContext
from fxforge.meta import record_rewrite, tensor_shape
from fxforge.pass_api import Pass, PassResult, register_pass

from .matching import (
    call_count,
    calls_module,
    is_out_of_place_add,
    is_relu,
    module_of,
    replace_submodule,
    sole_user,
)

POST_OPS = ("add+relu", "add", "relu")


class FusedConv(nn.Module):
    """``conv`` followed by ``post_ops`` ("relu", "add", "add+relu"), as one module."""

    def __init__(self, conv: nn.Module, post_ops: str) -> None:
        super().__init__()
        self.conv = conv
        self.post_ops = post_ops

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        if other is not None:
            y = y + other
        return torch.relu(y) if self.post_ops.endswith("relu") else y

    def extra_repr(self) -> str:
        return f"post_ops={self.post_ops!r}"


class FusedLinear(nn.Module):
    """``linear`` followed by relu, as one module."""

    def __init__(self, linear: nn.Linear, post_ops: str = "relu") -> None:
        super().__init__()
        self.linear = linear
        self.post_ops = post_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))

    def extra_repr(self) -> str:
        return f"post_ops={self.post_ops!r}"


def _parse_post_ops(text: str) -> frozenset[str]:
    ops = frozenset(filter(None, text.split("+")))
    if not ops <= {"add", "relu"}:
        raise ValueError(f"post_ops={text!r}: use a '+'-joined subset of add, relu (e.g. add+relu)")
    return ops


def _match_add(conv: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """conv + other (either operand order) with equal shapes -> (add node, other)."""
    add = sole_user(conv)
    if add is None or not is_out_of_place_add(add) or add.args[0] is add.args[1]:
        return None
    other = add.args[1] if add.args[0] is conv else add.args[0]
    if tensor_shape(other) is None or tensor_shape(other) != tensor_shape(conv):
        return None
    return add, other


def _match_relu(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    user = sole_user(node)
    return user if user is not None and is_relu(gm, user) else None


def _replace_chain(gm: fx.GraphModule, conv: fx.Node, chain: list[fx.Node], module: nn.Module,
                   args: tuple, pass_name: str) -> None:
    """Replace ``conv`` and the nodes of ``chain`` (in order, each the sole user of the previous) with one call."""
    replace_submodule(gm, str(conv.target), module)
    last = chain[-1] if chain else conv
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(str(conv.target), args)
    last.replace_all_uses_with(new)
    record_rewrite(new, pass_name, conv, *chain)
    for node in reversed([conv, *chain]):
        gm.graph.erase_node(node)


def _fusable(gm: fx.GraphModule, node: fx.Node, types: tuple[type, ...]) -> bool:
    """A call of one of ``types`` that is not shared (replacing a shared module would change other calls)."""
    return calls_module(gm, node, types) and call_count(gm, str(node.target)) == 1


@register_pass
@dataclass(frozen=True)
class FuseConv(Pass):
    """conv [+ other] [-> relu] -> FusedConv."""

    name = "fuse-conv"
    requires = frozenset({"bn-folded"})
    post_ops: str = "add+relu"

    def __post_init__(self) -> None:
        _parse_post_ops(self.post_ops)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.shapes(gm)
        allowed = _parse_post_ops(self.post_ops)
        counts = dict.fromkeys(POST_OPS, 0)
        convs = [n for n in gm.graph.nodes if _fusable(gm, n, (nn.modules.conv._ConvNd,))]
        for conv in convs:
            fused = self._fuse_one(gm, conv, allowed)
            if fused:
                counts[fused] += 1
        summary = ", ".join(f"{n} conv+{k}" for k, n in counts.items() if n)
        return PassResult(gm, any(counts.values()), [f"fused {summary}"] if summary else [])

    def _fuse_one(self, gm: fx.GraphModule, conv: fx.Node, allowed: frozenset[str]) -> str | None:
        conv_module = module_of(gm, conv)
        added = _match_add(conv) if "add" in allowed else None
        tail = added[0] if added else conv
        relu = _match_relu(gm, tail) if "relu" in allowed else None
        if added is None and relu is None:
            return None
        post_ops = "+".join(op for op, present in (("add", added), ("relu", relu)) if present)
        chain = [n for n in (added and added[0], relu) if n is not None]
        args = (conv.args[0], added[1]) if added else (conv.args[0],)
        _replace_chain(gm, conv, chain, FusedConv(conv_module, post_ops), args, self.name)
        return post_ops


@register_pass
@dataclass(frozen=True)
class FuseLinear(Pass):
    """linear -> relu -> FusedLinear."""

    name = "fuse-linear"
    requires = frozenset({"bn-folded"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        count = 0
        for linear in [n for n in gm.graph.nodes if _fusable(gm, n, (nn.Linear,))]:
            relu = _match_relu(gm, linear)
            if relu is not None:
                _replace_chain(gm, linear, [relu], FusedLinear(module_of(gm, linear)), (linear.args[0],), self.name)
                count += 1
        return PassResult(gm, count > 0, [f"fused {count} linear+relu"] if count else [])

"""fuse-conv, fuse-linear: merge a conv/linear with the elementwise ops that follow it into one module.

Rewrites (tried in this order per conv, first match wins):
    conv(x) + other -> relu   =>  FusedConv[add+relu](x, other)     # residual block tail
    conv(x) + other           =>  FusedConv[add](x, other)
    conv(x) -> act            =>  FusedConv[act](x)                 # act: relu, relu6, hardswish, silu
    linear(x) -> act          =>  FusedLinear[act](x)
Why correct: the fused module runs exactly the original ops in the original order (its eager forward is
the reference semantics); backends then lower it to one fused kernel (oneDNN post-ops on "cpu").
Only intermediate values with a single user are absorbed, so no other node needed them (and an in-place
activation on such a value mutates nothing anyone else reads); ``other`` must have the conv output's shape
(no broadcasting), which is what the fused kernels accept. The fused call runs where the last absorbed
op ran, so nothing fuses across an op with side effects (an in-place op could change the conv's input).
After an add only relu is fused: that is the binary+unary chain the kernels implement.
Preconditions: BN folded first (``bn-folded``), otherwise ``conv -> bn -> relu`` has nothing to fuse;
in-place adds normalized to ``operator.add`` by ``normalize-inplace``.

Before: ``y = relu(conv(x) + identity)``   After: ``y = fused_conv(x, identity)``
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxforge.context import PassContext
from fxforge.meta import record_rewrite, tensor_shape
from fxforge.pass_api import Pass, PassResult, register_pass

from .matching import (
    ACTIVATIONS,
    activation_of,
    call_count,
    calls_module,
    is_out_of_place_add,
    module_of,
    mutation_between,
    replace_submodule,
    sole_user,
)

DEFAULT_POST_OPS = "add+relu+relu6+hardswish+silu"


class FusedConv(nn.Module):
    """``conv``, then ``+ other`` when ``add``, then ``activation`` (a key of ACTIVATIONS, or "")."""

    def __init__(self, conv: nn.Module, add: bool = False, activation: str = "") -> None:
        super().__init__()
        self.conv, self.add, self.activation = conv, add, activation

    @property
    def post_ops(self) -> str:
        return "+".join(filter(None, ("add" if self.add else "", self.activation)))

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        if self.add:
            y = y + other
        return ACTIVATIONS[self.activation](y) if self.activation else y

    def extra_repr(self) -> str:
        return f"post_ops={self.post_ops!r}"


class FusedLinear(nn.Module):
    """``linear`` followed by ``activation`` (a key of ACTIVATIONS)."""

    def __init__(self, linear: nn.Linear, activation: str = "relu") -> None:
        super().__init__()
        self.linear, self.activation = linear, activation

    @property
    def post_ops(self) -> str:
        return self.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](self.linear(x))

    def extra_repr(self) -> str:
        return f"post_ops={self.post_ops!r}"


def parse_post_ops(text: str) -> frozenset[str]:
    ops = frozenset(filter(None, text.split("+")))
    valid = {"add", *ACTIVATIONS}
    if not ops <= valid:
        raise ValueError(f"post_ops={text!r}: use a '+'-joined subset of {', '.join(sorted(valid))}")
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


def _match_activation(gm: fx.GraphModule, node: fx.Node, allowed: frozenset[str]) -> tuple[fx.Node, str] | None:
    """The sole user of ``node`` when it is an allowed activation -> (that node, activation name)."""
    user = sole_user(node)
    name = activation_of(gm, user) if user is not None else None
    return (user, name) if name in allowed else None


def _replace_chain(gm: fx.GraphModule, layer: fx.Node, chain: list[fx.Node], module: nn.Module,
                   args: tuple, pass_name: str) -> None:
    """Replace ``layer`` and ``chain`` (in order, each the sole user of the previous) with one module call."""
    replace_submodule(gm, str(layer.target), module)
    last = chain[-1]
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(str(layer.target), args)
    last.replace_all_uses_with(new)
    record_rewrite(new, pass_name, layer, *chain)
    for node in reversed([layer, *chain]):
        gm.graph.erase_node(node)


def _fusable(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    """A call of one of ``types`` that is not shared (replacing a shared module would change other calls)."""
    return calls_module(gm, node, types) and call_count(gm, str(node.target)) == 1


def _summary(kind: str, counts: Counter) -> list[str]:
    return [f"fused {', '.join(f'{n} {kind}+{ops}' for ops, n in sorted(counts.items()))}"] if counts else []


@register_pass
@dataclass(frozen=True)
class FuseConv(Pass):
    """conv [+ other] [-> activation] -> FusedConv."""

    name = "fuse-conv"
    requires = frozenset({"bn-folded"})
    post_ops: str = DEFAULT_POST_OPS

    def __post_init__(self) -> None:
        parse_post_ops(self.post_ops)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.shapes(gm)
        allowed = parse_post_ops(self.post_ops)
        counts: Counter = Counter()
        for conv in [n for n in gm.graph.nodes if _fusable(gm, n, nn.modules.conv._ConvNd)]:
            fused = _fuse_conv(gm, conv, allowed, self.name)
            if fused:
                counts[fused] += 1
        if counts:
            gm.delete_all_unused_submodules()  # the absorbed activation modules
        return PassResult(gm, bool(counts), _summary("conv", counts))


def _fuse_conv(gm: fx.GraphModule, conv: fx.Node, allowed: frozenset[str], pass_name: str) -> str | None:
    added = _match_add(conv) if "add" in allowed else None
    after_add = allowed & {"relu"} if added else allowed
    act = _match_activation(gm, added[0] if added else conv, after_add)
    if added is None and act is None:
        return None
    chain = [n for n in (added and added[0], act and act[0]) if n is not None]
    if mutation_between(conv, chain[-1], gm):  # the fused call runs at chain[-1]: inputs must not change first
        return None
    args = (conv.args[0], added[1]) if added else (conv.args[0],)
    fused = FusedConv(module_of(gm, conv), add=added is not None, activation=act[1] if act else "")
    _replace_chain(gm, conv, chain, fused, args, pass_name)
    return fused.post_ops


@register_pass
@dataclass(frozen=True)
class FuseLinear(Pass):
    """linear -> activation -> FusedLinear."""

    name = "fuse-linear"
    requires = frozenset({"bn-folded"})
    post_ops: str = "relu+relu6+hardswish+silu"

    def __post_init__(self) -> None:
        if "add" in parse_post_ops(self.post_ops):
            raise ValueError("fuse-linear fuses activations only; 'add' is not supported")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        allowed = parse_post_ops(self.post_ops)
        counts: Counter = Counter()
        for linear in [n for n in gm.graph.nodes if _fusable(gm, n, nn.Linear)]:
            act = _match_activation(gm, linear, allowed)
            if act is not None and not mutation_between(linear, act[0], gm):
                fused = FusedLinear(module_of(gm, linear), act[1])
                _replace_chain(gm, linear, [act[0]], fused, (linear.args[0],), self.name)
                counts[act[1]] += 1
        if counts:
            gm.delete_all_unused_submodules()
        return PassResult(gm, bool(counts), _summary("linear", counts))

"""fuse-conv, fuse-linear: merge a conv/linear with the elementwise ops that follow it into one module.

Rewrites (``CONV_RULES`` / ``LINEAR_RULES``, fxforge.patterns rules: from the graph's end backwards, the first
rule that matches wins, so a conv+add+relu is not cut short as a conv+add):
    conv(x) + other -> relu   =>  FusedConv[add+relu](x, other)     # residual block tail
    conv(x) + other           =>  FusedConv[add](x, other)
    conv(x) -> act            =>  FusedConv[act](x)                 # act: relu, relu6, hardswish, silu
    linear(x) -> act          =>  FusedLinear[act](x)
Why correct: the fused module runs exactly the original ops in the original order (its eager forward is the
reference semantics); backends then lower it to one fused kernel. Absorbed values have a single user, so no
other node needed them; ``other`` has the conv output's shape (no broadcasting, as the fused kernels need);
nothing fuses across an op with side effects, since the fused call runs where the last absorbed op ran.
After an add only relu is fused: that is the binary + unary chain the kernels implement.
Preconditions: BN folded first (``bn-folded``); in-place adds normalized by ``normalize-inplace``.

Before: ``y = relu(conv(x) + identity)``   After: ``y = fused_conv(x, identity)``
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn

from fxforge.graph import patterns as P
from fxforge.graph.fused import FusedConv, FusedLinear
from fxforge.graph.matching import ACTIVATIONS, activation_of, call_count, replace_submodule
from fxforge.graph.meta import tensor_shape
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass

DEFAULT_POST_OPS = "add+relu+relu6+hardswish+silu"


def parse_post_ops(text: str) -> frozenset[str]:
    ops = frozenset(filter(None, text.split("+")))
    valid = {"add", *ACTIVATIONS}
    if not ops <= valid:
        raise ValueError(f"post_ops={text!r}: use a '+'-joined subset of {', '.join(sorted(valid))}")
    return ops


def _is_activation(node: fx.Node) -> bool:
    return activation_of(node.graph.owning_module, node) is not None


def _not_shared(node: fx.Node) -> bool:
    """Replacing a module called more than once (shared weights) would change its other calls too."""
    return call_count(node.graph.owning_module, str(node.target)) == 1


@dataclass
class _Fusing:
    """What builders read (``match.options``): the allowed post-ops, and counts for the report's note."""

    allowed: frozenset[str]
    counts: Counter = field(default_factory=Counter)


def _fused_call(m: P.Match, layer: str, module: nn.Module, args: tuple) -> fx.Node:
    """Put ``module`` at the layer's path (keeping the module path for reports) and call it there."""
    target = str(m[layer].target)
    replace_submodule(m.gm, target, module)
    m.options.counts[module.post_ops] += 1
    return m.graph.call_module(target, args)


def _residual(m: P.Match) -> bool:
    """``other`` is a tensor of the conv output's shape: a residual, not a broadcast the kernels cannot take."""
    other, shape = m["other"], tensor_shape(m["conv"])
    return isinstance(other, fx.Node) and shape is not None and tensor_shape(other) == shape


def _conv_add_act(m: P.Match) -> fx.Node | None:
    act = activation_of(m.gm, m["act"])
    if act != "relu" or not {"add", "relu"} <= m.options.allowed or not _residual(m):
        return None  # after an add the kernels fuse relu only
    return _fused_call(m, "conv", FusedConv(m.module("conv"), add=True, activation=act), (m["x"], m["other"]))


def _conv_add(m: P.Match) -> fx.Node | None:
    if "add" not in m.options.allowed or not _residual(m):
        return None
    return _fused_call(m, "conv", FusedConv(m.module("conv"), add=True), (m["x"], m["other"]))


def _conv_act(m: P.Match) -> fx.Node | None:
    act = activation_of(m.gm, m["act"])
    if act not in m.options.allowed:
        return None
    return _fused_call(m, "conv", FusedConv(m.module("conv"), activation=act), (m["x"],))


def _linear_act(m: P.Match) -> fx.Node | None:
    act = activation_of(m.gm, m["act"])
    if act not in m.options.allowed:
        return None
    return _fused_call(m, "linear", FusedLinear(m.module("linear"), act), (m["x"],))


_CONV = P.module(nn.modules.conv._ConvNd, name="conv")
_LINEAR = P.module(nn.Linear, name="linear")
_ACT = P.any_node(where=_is_activation, name="act")  # relu, relu6, hardswish, silu in any spelling

CONV_RULES = [
    # act(conv(x) + other) -> FusedConv[add+act](x, other)       (a residual block's tail; act: relu)
    P.Rule(lambda x, other: _ACT(_CONV(x) + other), build=_conv_add_act, where={"conv": _not_shared},
           name="act(conv(x) + other) -> FusedConv[add+act]"),
    # conv(x) + other -> FusedConv[add](x, other)
    P.Rule(lambda x, other: _CONV(x) + other, build=_conv_add, where={"conv": _not_shared},
           name="conv(x) + other -> FusedConv[add]"),
    # act(conv(x)) -> FusedConv[act](x)
    P.Rule(lambda x: _ACT(_CONV(x)), build=_conv_act, where={"conv": _not_shared},
           name="act(conv(x)) -> FusedConv[act]"),
]
LINEAR_RULES = [
    # act(linear(x)) -> FusedLinear[act](x)
    P.Rule(lambda x: _ACT(_LINEAR(x)), build=_linear_act, where={"linear": _not_shared},
           name="act(linear(x)) -> FusedLinear[act]"),
]


def _summary(kind: str, counts: Counter) -> list[str]:
    return [f"fused {', '.join(f'{n} {kind}+{ops}' for ops, n in sorted(counts.items()))}"] if counts else []


def _fuse(gm: fx.GraphModule, ctx: PassContext, rules: list[P.Rule], allowed: frozenset[str], kind: str
          ) -> PassResult:
    fusing = _Fusing(allowed)
    result = P.rewrite(gm, rules, ctx, options=fusing)
    result.notes.extend(_summary(kind, fusing.counts))
    return result


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
        ctx.shapes(gm)  # the residual check compares shapes
        return _fuse(gm, ctx, CONV_RULES, parse_post_ops(self.post_ops), "conv")


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
        return _fuse(gm, ctx, LINEAR_RULES, parse_post_ops(self.post_ops), "linear")

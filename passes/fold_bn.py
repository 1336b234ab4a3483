"""fold-bn: fold an eval-mode BatchNorm into the convolution or linear layer that feeds it.

Rewrites: ``conv -> bn`` (Conv1d/2d/3d, ConvTranspose1d/2d/3d) and ``linear -> bn1d`` into one conv/linear
with new weights; the BatchNorm disappears.
Why correct: eval-mode BN is the per-channel affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``. Composed with ``x = W * in + b`` it is ``(s * W) * in + (b - mean) * s + beta``:
scale each output channel's weights by ``s`` (axis 0 for conv/linear, axis 1 within each group for transposed
convs, whose weight is ``[in, out / groups, ...]``). Computed in float64, then cast back.
Preconditions: eval mode; shapes propagated (Linear is folded only when its output is 2-D, because
BatchNorm1d normalizes dim 1, which is the feature dim only then).
Left alone, with the reason in the report: a conv/linear whose output has other users or whose module is
called more than once (shared weights), anything between the layer and the BN (``conv -> relu -> bn``),
BN without running statistics, and channel-count mismatches.

Before: ``y = bn(conv(x))``
After:  ``y = conv'(x)`` with ``conv'.weight = s * W``, ``conv'.bias = (b - mean) * s + beta``
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from fxforge.graph.matching import call_count, calls_module, module_of, replace_submodule
from fxforge.graph.meta import record_rewrite, tensor_shape
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import graph_pass
from fxforge.pipeline.verify import invariant

_BN = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd
_TRANSPOSED = nn.modules.conv._ConvTransposeNd


def why_not_foldable(gm: fx.GraphModule, bn_node: fx.Node) -> str | None:
    """None when ``bn_node`` can be folded into its producer, else the reason it cannot."""
    bn = module_of(gm, bn_node)
    producer = bn_node.args[0] if bn_node.args else None
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm has no running statistics (track_running_stats=False)"
    if not isinstance(producer, fx.Node) or not calls_module(gm, producer, (_CONV, nn.Linear)):
        what = getattr(producer, "name", repr(producer))
        return f"its input '{what}' is not a conv/linear layer, so there is nothing to fold into"
    layer = module_of(gm, producer)
    if len(producer.users) > 1:
        return f"'{producer.target}' output is also used elsewhere, which needs the unfolded value"
    if call_count(gm, str(producer.target)) > 1:
        return f"'{producer.target}' is called more than once (shared weights)"
    out_channels = layer.out_channels if isinstance(layer, _CONV) else layer.out_features
    if out_channels != bn.num_features:
        return f"'{producer.target}' has {out_channels} output channels but the BatchNorm has {bn.num_features}"
    if isinstance(layer, nn.Linear):
        shape = tensor_shape(producer)
        if shape is None or len(shape) != 2:
            return f"Linear output is not 2-D ({'unknown shape' if shape is None else list(shape)})"
    return None


def folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of conv/linear ``layer`` with eval-mode ``bn`` folded in (float64 math, original dtype)."""
    w = layer.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    kernel_dims = [1] * (w.dim() - 2)
    if isinstance(layer, _TRANSPOSED):  # weight [in, out/groups, *k]: out channels on axis 1 within each group
        g = layer.groups
        new_w = (w.unflatten(0, (g, -1)) * scale.reshape(g, 1, -1, *kernel_dims)).flatten(0, 1)
    else:  # weight [out, in/groups, *k] (or [out, in] for Linear): out channels on axis 0
        new_w = w * scale.reshape(-1, 1, *kernel_dims)
    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(new_w.to(layer.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(((bias - mean) * scale + beta).to(layer.weight.dtype), requires_grad=False)
    return fused


@graph_pass(name="fold-bn", requires=("eval",), provides=("bn-folded",))
def fold_bn(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Fold BatchNorm into the preceding conv/linear."""
    ctx.shapes(gm)
    folded = 0
    for bn_node in [n for n in gm.graph.nodes if calls_module(gm, n, _BN)]:
        reason = why_not_foldable(gm, bn_node)
        if reason:
            ctx.note(f"kept '{bn_node.target}': {reason}")
            continue
        producer = bn_node.args[0]
        replace_submodule(gm, str(producer.target), folded_layer(module_of(gm, producer), module_of(gm, bn_node)))
        bn_node.replace_all_uses_with(producer)
        record_rewrite(producer, "fold-bn", producer, bn_node)
        gm.graph.erase_node(bn_node)
        folded += 1
    if folded:
        gm.delete_all_unused_submodules()
        ctx.note(f"folded {folded} BatchNorm(s)")
    return folded > 0


@invariant("bn-folded")
def _no_foldable_bn_left(gm: fx.GraphModule) -> str | None:
    left = [str(n.target) for n in gm.graph.nodes if calls_module(gm, n, _BN) and why_not_foldable(gm, n) is None]
    return f"foldable BatchNorm left: {', '.join(left)}" if left else None

"""equalize: cross-layer equalization of consecutive conv/linear layers, an optional pass before quantization.

Rewrites, for ``layer1 -> [relu] -> layer2`` (Conv2d/Linear, ``groups == 1``, layer1's output channels being
layer2's input channels), each channel ``i`` with ``s_i = sqrt(r1_i / r2_i)``, where ``r1_i`` is the largest
``|weight|`` of layer1's output channel ``i`` and ``r2_i`` that of layer2's input channel ``i``::

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i        (both ranges become sqrt(r1_i * r2_i))
Why correct: relu is positively homogeneous (``relu(x / s) = relu(x) / s`` for ``s > 0``) and layer2 is linear
in each input channel, so the function is unchanged up to float rounding (computed in float64). Why useful:
per-tensor int8 weights share one scale across channels whose ranges can differ by orders of magnitude
(Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction"). Chains are swept
until the scales settle (at most 20 sweeps).
Preconditions: eval; BatchNorm folded first; before ``fuse-*``. Left alone: grouped convs, activations other
than relu (not homogeneous), values with other readers, modules called more than once.

Before: ``y = conv2(relu(conv1(x)))``   After: the same graph, with equalized weights.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxforge.graph.matching import call_count, is_relu, module_of, sole_user
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import graph_pass

_LAYERS = (nn.Conv2d, nn.Linear)
_SWEEPS, _SETTLED = 20, 1e-4


def _layer(gm: fx.GraphModule, node: fx.Node | None) -> nn.Module | None:
    """A plain, ungrouped Conv2d/Linear called only here, else None."""
    module = module_of(gm, node) if node is not None else None
    if type(module) not in _LAYERS or getattr(module, "groups", 1) != 1 or call_count(gm, str(node.target)) != 1:
        return None
    return module


def _pairs(gm: fx.GraphModule) -> list[tuple[nn.Module, nn.Module]]:
    """(layer1, layer2) for every ``layer1 -> [relu] -> layer2`` chain that may be equalized."""
    pairs = []
    for node in gm.graph.nodes:
        first = _layer(gm, node)
        user = sole_user(node) if first is not None else None
        if user is not None and is_relu(gm, user) and not user.kwargs and len(user.args) == 1:
            user = sole_user(user)
        second = _layer(gm, user)
        if second is not None and len(user.args) == 1 and not user.kwargs and _channels_match(first, second):
            pairs.append((first, second))
    return pairs


def _channels_match(first: nn.Module, second: nn.Module) -> bool:
    out = first.out_channels if isinstance(first, nn.Conv2d) else first.out_features
    inp = second.in_channels if isinstance(second, nn.Conv2d) else second.in_features
    return out == inp


@torch.no_grad()
def _equalize(first: nn.Module, second: nn.Module) -> float:
    """Equalize one pair in place; returns the largest |log s_i| (0 when already equal)."""
    w1, w2 = first.weight.double(), second.weight.double()
    r1 = w1.abs().flatten(1).amax(1)
    r2 = w2.abs().transpose(0, 1).flatten(1).amax(1)
    s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(1e-300)).sqrt(), torch.ones_like(r1))
    shape1, shape2 = [-1] + [1] * (w1.dim() - 1), [1, -1] + [1] * (w2.dim() - 2)
    first.weight.copy_(w1 / s.view(shape1))
    if first.bias is not None:
        first.bias.copy_(first.bias.double() / s)
    second.weight.copy_(w2 * s.view(shape2))
    return s.log().abs().max().item() if s.numel() else 0.0


@graph_pass(name="equalize", requires=("eval",))
def equalize(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Cross-layer equalization of conv/linear pairs joined by relu (or nothing)."""
    pairs = _pairs(gm)
    sweeps = 0
    while sweeps < _SWEEPS:
        sweeps += 1
        if max((_equalize(a, b) for a, b in pairs), default=0.0) < _SETTLED:
            break
    if pairs:
        ctx.note(f"equalized {len(pairs)} layer pair(s) in {sweeps} sweep(s)")
    return bool(pairs)

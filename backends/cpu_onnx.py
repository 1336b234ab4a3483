"""ONNX twins of the cpu backend's oneDNN modules (used by ``fxforge.serialization.onnx.export_onnx``).

The ONNX exporter cannot record oneDNN's opaque prepacked weights nor its pointwise ops. Each twin computes
the same function with eager ops on the module's dense fp32 weight: ``conv2d`` / ``linear``, then the fused
add and activation in the order the oneDNN kernel applies them; the outputs differ by float summation order
only. bf16 modules (cpu-bf16) have no twin: their bf16 weights would export as another model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxforge.graph.matching import ACTIVATIONS
from fxforge.serialization.onnx import register_onnx_twin

from .cpu import OneDnnConv2d, OneDnnLinear, linear_activation
from .cpu_bf16 import OneDnnConv2dBf16, OneDnnLinearBf16


class EagerConv2d(nn.Module):
    """conv2d (+ add) (+ activation) on a dense weight: what ``OneDnnConv2d`` computes."""

    def __init__(self, conv: OneDnnConv2d) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight.detach())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach())
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups, self.binary, self.activation = conv.groups, conv.binary, conv.activation

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.binary and other is not None:
            y = y + other
        return ACTIVATIONS[self.activation](y) if self.activation else y


class EagerLinear(nn.Module):
    """linear (+ add) (+ activation) on a dense weight: what ``OneDnnLinear`` computes."""

    def __init__(self, linear: OneDnnLinear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.binary, self.activation = linear.binary, linear.activation

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.binary and other is not None:
            return y + other
        return linear_activation(self.activation)(y) if self.activation else y


@register_onnx_twin
def onnx_twin(module: nn.Module) -> nn.Module | None:
    """The eager twin of a fp32 oneDNN module, else None."""
    if isinstance(module, (OneDnnConv2dBf16, OneDnnLinearBf16)):
        return None
    if isinstance(module, OneDnnConv2d):
        return EagerConv2d(module)
    if isinstance(module, OneDnnLinear):
        return EagerLinear(module)
    return None

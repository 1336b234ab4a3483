"""TorchScript twins of the cpu backend's oneDNN modules (used by ``CompiledModule.to_torchscript``).

TorchScript cannot hold the opaque prepacked oneDNN weights (``Unsupported value kind: Tensor``), and
its tracer cannot record the ``Scalar?[]`` argument of the oneDNN pointwise ops. These twins are scripted
instead of traced and call the same ops with the dense weight, which oneDNN reorders per call: the
results are bit-identical to the prepacked modules (tested), at some cost in speed.
"""

# No ``from __future__ import annotations``: TorchScript reads these annotations as objects, not text.
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxforge.serialization.torchscript import register_scripted_twin

from .cpu import OneDnnConv2d, OneDnnLinear

# TorchScript spells the ops' ``Scalar?[]`` this way (List[Optional[float]] is rejected).
Scalars = list[Optional[Union[int, float, complex]]]  # noqa: UP007,UP045 - TorchScript reads no ``X | None``


def _activation(y: torch.Tensor, name: str) -> torch.Tensor:
    """The eager activations of fxforge.graph.ops.ACTIVATIONS, spelled for TorchScript."""
    if name == "relu":
        return torch.relu(y)
    if name == "relu6":
        return F.relu6(y)
    if name == "hardswish":
        return F.hardswish(y)
    if name == "silu":
        return F.silu(y)
    return y


class ScriptableOneDnnConv2d(nn.Module):
    padding: list[int]
    stride: list[int]
    dilation: list[int]
    groups: int
    binary: bool
    activation: str
    unary: str
    unary_scalars: Scalars
    no_scalars: Scalars
    binary_unary: Optional[str]  # noqa: UP045

    def __init__(self, conv: OneDnnConv2d) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight)
        self.register_buffer("bias", conv.bias)
        self.padding, self.stride, self.dilation, self.groups = conv.padding, conv.stride, conv.dilation, conv.groups
        self.binary, self.activation, self.unary = conv.binary, conv.activation, conv.unary
        self.unary_scalars, self.no_scalars = [float(s) for s in conv.unary_scalars], []
        self.binary_unary = conv.binary_unary

    def forward(self, x: torch.Tensor, other: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
        x = x.contiguous(memory_format=torch.channels_last)
        if not self.binary or other is None:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                           self.dilation, self.groups, self.unary,
                                                           self.unary_scalars, "")
        if other.size(1) == 1 or other.size(2) * other.size(3) == 1:  # as OneDnnConv2d.forward: add outside
            y = torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                        self.dilation, self.groups, "none", self.no_scalars, "")
            return _activation(y + other, self.activation)
        return torch.ops.mkldnn._convolution_pointwise(x, other, self.weight, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "add", None, self.binary_unary,
                                                       self.unary_scalars, "")


class ScriptableOneDnnLinear(nn.Module):
    unary: str
    unary_scalars: Scalars
    algorithm: str
    binary: bool

    def __init__(self, linear: OneDnnLinear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight)
        self.register_buffer("bias", linear.bias)
        self.unary, self.unary_scalars = linear.unary, [float(s) for s in linear.unary_scalars]
        self.algorithm, self.binary = linear.algorithm, linear.binary

    def forward(self, x: torch.Tensor, other: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
        if self.binary and other is not None:
            return torch.ops.mkldnn._linear_pointwise(x, other, self.weight, self.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.unary, self.unary_scalars,
                                                  self.algorithm)


@register_scripted_twin
def scripted_twin(module: nn.Module) -> torch.jit.ScriptModule | None:
    """The scripted twin of a oneDNN module, else None."""
    if getattr(module, "native", True) is False:  # cpu-bf16 emulated (no oneDNN bf16 on this CPU): eager ops trace
        return None
    if isinstance(module, OneDnnConv2d):
        return torch.jit.script(ScriptableOneDnnConv2d(module))
    if isinstance(module, OneDnnLinear):
        return torch.jit.script(ScriptableOneDnnLinear(module))
    return None

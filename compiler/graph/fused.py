"""The fused module types that fusion passes rewrite into and quantization and the lowerings read.

``FusedConv`` is ``conv``, then ``+ other`` when ``add``, then an activation; ``FusedLinear`` is ``linear`` then
an activation. Their ``forward`` is the eager reference semantics; backends replace them with their kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import ACTIVATIONS


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

"""Helpers for checking compiled models numerically on random-init models (tests, benchmarks, demos).

Random-init models are poor numeric references: default BatchNorm is the identity (hiding a wrong fold)
and deep random networks can shrink their output towards zero. ``randomize_bn`` and ``reestimate_bn`` fix
that before a model is used as a reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters on every BatchNorm (in place; returns ``model``)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BN):
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate BatchNorm statistics as the average over ``batches``; returns ``model`` in eval mode."""
    for m in model.modules():
        if isinstance(m, _BN):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
    model.train()
    for b in batches:
        model(b)
    return model.eval()

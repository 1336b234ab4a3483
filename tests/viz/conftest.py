"""Compiled models shared by the viz tests (compiled once per session: the tests only read them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxforge
from helpers import one_intra_op_thread

SHAPE = (1, 3, 64, 64)  # small inputs: the graphs are what matter here, not the speed

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


def _zoo(name: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(SHAPE, generator=g) for _ in range(n)]


class Island(nn.Module):
    """conv -> exp -> clamp -> conv: exp has no int8 version, so the int8 graph keeps an fp32 island."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.exp(self.conv1(x)).clamp(max=5.0))


@pytest.fixture(scope="session")
def compiled_models() -> dict[str, fxforge.CompiledModule]:
    """resnet18 / mobilenet_v2 for the fp32 "cpu" and the int8 "x86" targets, and the island model on x86."""
    x = torch.randn(SHAPE)
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        model = _zoo(name)
        out[f"{name}-cpu"] = fxforge.compile(model, "cpu", example_inputs=x)
        out[f"{name}-x86"] = fxforge.compile(model, "x86", example_inputs=x, calibration=_batches(2))
    out["island-x86"] = fxforge.compile(Island().eval(), "x86", example_inputs=x, calibration=_batches(2))
    return out

"""Small models and graph queries shared by the quantization tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import fx, nn

import fxforge
from fxforge.passes import quantize_dynamic
from fxforge.pipeline.fragments import with_options, without
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import randomize_bn


def reference_pipeline(target: str, quantization: str | None = None) -> str:
    """The target's pipeline up to the reference int8 graph (without the lowering to int8 kernels)."""
    return without(fxforge.pipeline_for(target, quantization), f"lower-{target}")


def quantize_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.quantize_per_tensor]


def dequantize_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "dequantize"]


def dq_q_round_trips(gm: fx.GraphModule) -> list[fx.Node]:
    """Quantize nodes fed (possibly through shape ops) straight from a dequantize: wasted work and error."""
    return [q for q in quantize_nodes(gm) if isinstance(q.args[0], fx.Node) and q.args[0].target == "dequantize"]


def sqnr(model: nn.Module, compiled: nn.Module, *inputs: torch.Tensor) -> float:
    with torch.inference_mode():
        return outputs_sqnr_db(model(*inputs), compiled(*inputs))


class ConvBnRelu(nn.Module):
    """conv-bn-relu x2, a residual add, max-pool, flatten, linear: the toy net of the acceptance criteria."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class ConvFc(nn.Module):
    """A conv whose flattened output feeds a Linear (conv and linear quantized, flatten between them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(256, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def toy_model(seed: int = 0, channels: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(ConvBnRelu(channels)).eval()


def batches(n: int, shape: tuple[int, ...] = (4, 3, 8, 8), scale: float = 1.0, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]


def compile_reference(model: nn.Module, x: torch.Tensor | tuple, target: str = "x86", **kwargs
                      ) -> fxforge.CompiledModule:
    """``model``'s reference int8 graph for ``target`` (its pipeline without the lowering), calibrated on
    ``calibration`` when given, else on 4 batches shaped like ``x``."""
    if "calibration" not in kwargs:
        kwargs["calibration"] = batches(4, tuple(x.shape))
    kwargs.setdefault("pipeline", reference_pipeline(target))
    return fxforge.compile(model.eval(), target, example_inputs=x, **kwargs)


def compile_calibrated_on(model: nn.Module, target: str, x: torch.Tensor) -> tuple[fxforge.CompiledModule, float]:
    """Compile for ``target`` (lowering included) calibrated on ``x`` alone; (compiled, SQNR of its output on
    ``x`` against eager)."""
    compiled = fxforge.compile(model, target, example_inputs=x, calibration=[x])
    return compiled, sqnr(model, compiled, x)


def int8_where_it_holds(target: str = "x86", **options: object) -> str:
    """The target's dynamic pipeline choosing each RNN layer int8 where it holds its floor (not timed)."""
    return with_options(fxforge.pipeline_for(target, "dynamic"), "quantize-dynamic", time_rnn_layers=False,
                        **options)


@contextlib.contextmanager
def rnn_layers_timed_as(pick: str | None) -> Iterator[None]:
    """quantize-dynamic's timed choices as if ``pick`` ("bf16"; None: the incumbent, int8 or fp32) ran fastest:
    which kernel is faster is the machine's business, the tests need one choice."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize_dynamic.timing, "fastest",
                      lambda candidates, *_, **__: (pick or next(iter(candidates)), {}))
        yield

"""The int8 op table (fxforge.quant.ops): every op the int8 targets promise to quantize is quantized (not an fp32
island) and keeps SQNR high in the reference graph; ops without int8 kernels run in fp32 between their input's
qparams; pooling that scales its values gets qparams of its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import (
    compile_calibrated_on,
    compile_reference,
    dq_q_round_trips,
    quantize_nodes,
    reference_pipeline,
    sqnr,
)
from torch import nn

import fxforge
from helpers import randomize_bn


class Wrap(nn.Module):
    """``conv -> op -> conv`` so the op sits between quantized layers; ``op`` may be a module or a function."""

    def __init__(self, op, channels: int = 4, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.pre, self.op, self.post = conv(3, channels, 1), op, conv(channels, channels, 1)

    def forward(self, x):
        y = self.pre(x)
        y = self.op(y) if isinstance(self.op, nn.Module) else self.op(y)
        return self.post(y)


class Binary(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.a, self.b, self.fn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), fn

    def forward(self, x):  # relu'd operands: fuse-conv must not absorb the binary op into a conv
        return self.fn(torch.relu(self.a(x)), torch.relu(self.b(x)))


class MatMul(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(8, 8), nn.Linear(8, 8), fn

    def forward(self, x):
        return self.fn(self.a(x), self.b(x).transpose(1, 2))


X2 = torch.randn(2, 3, 8, 8)
CASES = {
    "conv1d": (Wrap(nn.ReLU(), dims=1), torch.randn(2, 3, 16), "conv"),
    "conv3d": (Wrap(nn.ReLU(), dims=3), torch.randn(2, 3, 4, 4, 4), "conv"),
    "conv-transpose": (Wrap(nn.ConvTranspose2d(4, 4, 2, stride=2)), X2, "conv-transpose"),
    "add": (Binary(torch.add), X2, "add"),
    "mul": (Binary(torch.mul), X2, "mul"),
    "cat": (Binary(lambda a, b: torch.cat([a, b], 1)[:, :4]), X2, "cat"),
    "relu6": (Wrap(nn.ReLU6()), X2, "relu6"),
    "hardtanh": (Wrap(nn.Hardtanh(-0.5, 0.5)), X2, "hardtanh"),
    "hardswish": (Wrap(nn.Hardswish()), X2, "hardswish"),
    "sigmoid": (Wrap(nn.Sigmoid()), X2, "sigmoid"),
    "silu": (Wrap(nn.SiLU()), X2, "silu"),
    "maxpool": (Wrap(nn.MaxPool2d(2)), X2, "maxpool"),
    "avgpool": (Wrap(nn.AvgPool2d(2)), X2, "avgpool"),
    "adaptive-avgpool": (Wrap(nn.AdaptiveAvgPool2d(2)), X2, "avgpool"),
    "batchnorm": (Wrap(randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))), X2, "batchnorm"),
    "interpolate-nearest": (Wrap(lambda t: F.interpolate(t, scale_factor=2.0)), X2, "interpolate"),
    "interpolate-bilinear": (Wrap(lambda t: F.interpolate(t, scale_factor=2.0, mode="bilinear")), X2, "interpolate"),
    "matmul": (MatMul(torch.matmul), torch.randn(2, 5, 8), "matmul"),
    "bmm": (MatMul(torch.bmm), torch.randn(2, 5, 8), "bmm"),
    # more spellings of the same ops (fxforge.graph.ops): each is quantized as its op
    "concat": (Binary(lambda a, b: torch.concat([a, b], 1)[:, :4]), X2, "cat"),
    "max_pool2d-torch": (Wrap(lambda t: torch.max_pool2d(t, 2)), X2, "maxpool"),
    "adaptive-maxpool-function": (Wrap(lambda t: F.adaptive_max_pool2d(t, 2)), X2, "maxpool"),
    "unflatten-function": (Wrap(lambda t: torch.unflatten(t.flatten(2), 2, (8, 8))), X2, "unflatten"),
    "sync-batchnorm": (Wrap(randomize_bn(nn.Sequential(nn.ReLU(), nn.SyncBatchNorm(4)))), X2, "batchnorm"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_op_is_quantized(name):
    torch.manual_seed(0)
    model, x, kind = CASES[name]
    model = model.eval()
    calibration = [torch.randn_like(x) for _ in range(16)]
    compiled = fxforge.compile(model, "x86", example_inputs=x, calibration=calibration,
                               pipeline=reference_pipeline("x86"))
    report = compiled.report.quantization
    assert not report.islands, report.islands
    assert not dq_q_round_trips(compiled.graph_module)
    assert len(quantize_nodes(compiled.graph_module)) >= 2
    ops = {r.op for r in report.layers} | {n.meta.get("fxforge", {}).get("quant", {}).get("kind")
                                           for n in compiled.graph_module.graph.nodes}
    assert kind in ops
    fresh = torch.randn_like(x)
    assert sqnr(model, compiled, fresh) >= 25
    lowered = fxforge.compile(model, "x86", example_inputs=x, calibration=calibration)
    assert sqnr(model, lowered, fresh) >= 25
    assert not dq_q_round_trips(lowered.graph_module)


class InPlace(nn.Module):
    """In-place spellings on values only they read: ``conv(x).relu_()``, ``conv(x).add_(y)``, ``torch.sigmoid_``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x).relu_()
        return self.c(torch.sigmoid_(self.b(x).add_(y)))


def test_in_place_spellings_are_quantized_as_their_op():
    """Without normalize-inplace before it, quantization still sees relu, add and sigmoid (no fp32 islands):
    each mutates a fresh value nothing else reads."""
    torch.manual_seed(0)
    model, x = InPlace().eval(), X2
    calibration = [torch.randn_like(x) for _ in range(16)]
    fresh = torch.randn_like(x)
    reference = "insert-observers,calibrate,insert-qdq"
    for pipeline in (reference, f"{reference},lower-x86"):
        compiled = fxforge.compile(model, "x86", example_inputs=x, calibration=calibration, pipeline=pipeline)
        assert not compiled.report.quantization.islands, compiled.report.quantization.islands
        assert sqnr(model, compiled, fresh) >= 25
        if pipeline == reference:
            plans = [n.meta.get("fxforge", {}).get("quant", {}) for n in compiled.graph_module.graph.nodes]
            assert {"relu", "add", "sigmoid"} <= {plan.get("kind") for plan in plans}
class ConvThen(nn.Module):
    def __init__(self, dims: int, middle: nn.Module) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.a, self.middle, self.b = conv(3, 4, 1), middle, conv(4, 4, 1)

    def forward(self, x):
        return self.b(self.middle(self.a(x)))


class Interpolate1d(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2)


@pytest.mark.parametrize(("dims", "middle"), [
    (2, nn.AdaptiveMaxPool2d(2)), (1, nn.Upsample(scale_factor=2)), (1, Interpolate1d())],
    ids=["adaptive-max-pool2d", "upsample-1d", "interpolate-1d"])
def test_value_picking_ops_without_quantized_kernels_compile_and_keep_qparams(dims, middle):
    torch.manual_seed(0)
    model = ConvThen(dims, middle).eval()
    x = torch.randn((2, 3, 8) if dims == 1 else (2, 3, 8, 8))
    compiled = compile_reference(model, x)
    assert sqnr(model, compiled, x) > 25
    middle_node = next(n for n in compiled.graph_module.graph.nodes
                       if n.target == "middle" or n.target is F.interpolate)
    assert middle_node.args[0].target == "dequantize"  # runs in fp32 on the dequantized values
    requant = next(iter(middle_node.users))
    assert requant.target is torch.quantize_per_tensor
    assert requant.args[1].target == middle_node.args[0].args[0].args[1].target  # the input's qparams


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_average_pooling_with_a_divisor_override_gets_qparams_of_its_own(target: str, functional: bool):
    """Found by the graph fuzzer: average pooling requantized its output with its input's qparams, but with
    ``divisor_override`` it is a scaled sum (3x3 window / 2: up to 4.5x the input range), so outputs saturated:
    SQNR 19.7 dB (x86) and 15.6 dB (qnnpack, whose int8 kernel also ignores the override) for a single conv +
    pool, ~36 / 42 dB expected. Fix: the op table makes such pooling a compute op, with qparams of its own."""
    class ConvSumPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv2d(4, 4, 1), nn.AvgPool2d(3, divisor_override=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return F.avg_pool2d(y, 3, divisor_override=2) if functional else self.pool(y)

    _, db = compile_calibrated_on(ConvSumPool().eval(), target, torch.randn(3, 4, 9, 9))
    assert db >= 30.0

"""Squeeze-excitation blocks (mobilenet_v3, efficientnet) on the int8 targets: what the lowering emits.

Two lowering rules, found by profiling mobilenet_v3_large and efficientnet_b0 at batch 1 against torch.ao:
- ``scale [N,C,1,1] * x [N,C,H,W]`` -> ``quantized.mul(x, scale)``: torch's int8 mul lays its output out like
  its first operand, so with ``scale`` first the result was NCHW (a slow strided kernel, then a copy back to
  channels-last in the next conv); the full-size operand goes first.
- activation *modules* (``nn.Hardswish(inplace=True)``, ``nn.Sigmoid``) run on their int8 kernels as the
  functional forms did, instead of dequantize -> fp32 op -> quantize.
"""

from __future__ import annotations

import pytest
import torch
from quant_helpers import batches, dq_q_round_trips, reference_pipeline, sqnr
from torch import fx, nn

import fxforge
from fxforge.quant.qspec import quantized_engine
from helpers import reestimate_bn

ENGINES = ["x86", "fbgemm", "qnnpack"]
X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
_q = torch.ops.quantized
SE_POOL_FLOOR_DB = 45.0  # the local SQNR of the SE block's average pool (see its test)


class SqueezeExcitationNet(nn.Module):
    """stem conv + act, torchvision's SqueezeExcitation (``scale * input``), a projecting conv, a head."""

    def __init__(self, act: type[nn.Module], gate: type[nn.Module], c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), act(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.relu, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1)
        self.gate = gate()
        self.project = nn.Sequential(nn.Conv2d(c, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        scale = self.gate(self.fc2(self.relu(self.fc1(self.avgpool(y)))))
        return self.head(self.project(scale * y))


BLOCKS = {"mobilenet_v3": (nn.Hardswish, nn.Hardsigmoid), "efficientnet": (nn.SiLU, nn.Sigmoid)}


def se_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return reestimate_bn(SqueezeExcitationNet(*BLOCKS[kind]), batches(4, shape=X.shape, seed=40)).eval()


def compile_both(model: nn.Module, engine: str) -> tuple[fxforge.CompiledModule, fxforge.CompiledModule]:
    calibration = batches(6, shape=X.shape, seed=41)
    lowered = fxforge.compile(model, engine, example_inputs=X, calibration=calibration)
    reference = fxforge.compile(model, engine, example_inputs=X, calibration=calibration,
                                pipeline=reference_pipeline(engine))
    return lowered, reference


def node_values(compiled: fxforge.CompiledModule, x: torch.Tensor) -> dict[fx.Node, object]:
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            values[n] = super().run_node(n)
            return values[n]

    with torch.inference_mode(), quantized_engine(compiled.quant_options.runtime_engine):
        Recorder(compiled.graph_module).run(x)
    return values


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_se_mul_reads_the_full_size_operand_first(kind, engine):
    model = se_model(kind)
    lowered, reference = compile_both(model, engine)
    gm = lowered.graph_module
    muls = [n for n in gm.graph.nodes if n.target is _q.mul]
    assert len(muls) == 1, gm.code
    values = node_values(lowered, X)
    mul = muls[0]
    first, second, out = values[mul.args[0]], values[mul.args[1]], values[mul]
    assert first.shape == out.shape == (2, 16, 12, 12) and second.shape == (2, 16, 1, 1)
    assert out.is_quantized and out.is_contiguous(memory_format=torch.channels_last)
    # the swap is exact: the kernel gives the same int8 values with the operands in the traced order
    with torch.inference_mode(), quantized_engine(lowered.quant_options.runtime_engine):
        traced_order = _q.mul(second, first, *mul.args[2:])
    assert torch.equal(traced_order.int_repr(), out.int_repr())
    assert not dq_q_round_trips(gm)
    for x in batches(2, shape=X.shape, seed=42):
        with torch.inference_mode():
            steps = ((lowered(x) - reference(x)).abs() / reference.report.quantization.layers[-1].scale).round()
        assert (steps <= 1).float().mean() >= 0.95
    assert sqnr(model, lowered, X) >= 18


@pytest.mark.parametrize("engine", ENGINES)
def test_activation_modules_run_on_int8_kernels(engine):
    """nn.Hardswish(inplace=True) (mobilenet_v3's) lowers to quantized.hardswish and leaves nothing behind:
    the in-place module only mutated a dequantized copy that nothing else reads."""
    lowered, _ = compile_both(se_model("mobilenet_v3"), engine)
    gm = lowered.graph_module
    assert [n for n in gm.graph.nodes if n.target is _q.hardswish]
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                   nn.Hardswish)]
    lower = next(p for p in lowered.report.passes if p.name == f"lower-{engine}")
    assert "1 hardswish" in lower.notes[0]


def test_sigmoid_module_runs_on_the_int8_kernel_on_x86():
    lowered, reference = compile_both(se_model("efficientnet"), "x86")
    gm = lowered.graph_module
    assert [n for n in gm.graph.nodes if n.target is _q.sigmoid]
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                   nn.Sigmoid)]
    # SiLU has no int8 kernel: it keeps its reference form (dequantize -> silu -> quantize)
    assert [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.SiLU)]



GATES = {"mobilenet_v3": ("hardsigmoid", nn.Hardsigmoid, torch.nn.functional.hardsigmoid),
         "efficientnet": ("sigmoid", nn.Sigmoid, _q.sigmoid)}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_gates_have_fixed_qparams_and_run_on_int8_kernels(kind, engine):
    """A sigmoid / hardsigmoid gate's output range is [0, 1] whatever its input: it gets torch.ao's fixed qparams
    (1/256, 0), the ones its int8 kernel produces, instead of calibrated ones (which clipped the gate, e.g. at
    0.64), so every engine runs it on the int8 kernel: no fp32 island, no requantize after it."""
    model = se_model(kind)
    lowered, reference = compile_both(model, engine)
    op, module_type, kernel = GATES[kind]
    for compiled in (lowered, reference):
        gates = [r for r in compiled.report.quantization.layers if r.op == op]
        assert [(r.scale, r.zero_point, r.observer) for r in gates] == [(1 / 256, 0, "fixed([0, 1])")]
    gm = lowered.graph_module
    assert len([n for n in gm.graph.nodes if n.target is kernel]) == 1, gm.code
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                   module_type)]
    assert not lowered.report.quantization.islands or kind == "efficientnet"  # SiLU has no int8 kernel
    assert not dq_q_round_trips(gm)
    values = node_values(lowered, X)
    gate = next(n for n in gm.graph.nodes if n.target is kernel)
    assert (values[gate].q_scale(), values[gate].q_zero_point()) == (1 / 256, 0)
    for x in batches(2, shape=X.shape, seed=43):
        with torch.inference_mode():
            steps = ((lowered(x) - reference(x)).abs() / reference.report.quantization.layers[-1].scale).round()
        assert (steps <= 1).float().mean() >= 0.95
    assert sqnr(model, lowered, X) >= 18


def test_recalibrate_keeps_the_fixed_gate_kernel_running():
    """recalibrate re-reads each kernel's output qparams from its buffers; the hardsigmoid kernel takes none
    (its output qparams are fixed), so it must be left alone (it was handed a scale as its input)."""
    lowered, reference = compile_both(se_model("mobilenet_v3"), "x86")
    for compiled in (lowered, reference):
        fxforge.recalibrate(compiled, batches(2, shape=X.shape, seed=44))
    values = node_values(lowered, X)
    gate = next(n for n in lowered.graph_module.graph.nodes if n.target is torch.nn.functional.hardsigmoid)
    assert (values[gate].q_scale(), values[gate].q_zero_point()) == (1 / 256, 0)
    with torch.inference_mode():
        steps = ((lowered(X) - reference(X)).abs() / reference.report.quantization.layers[-1].scale).round()
    assert (steps <= 1).float().mean() >= 0.95


@pytest.mark.parametrize("engine", ENGINES)
def test_the_se_pool_keeps_its_means_on_a_grid_of_its_own(engine):
    """The means of whole feature maps spread over a fraction of their inputs' range: requantized on the
    inputs' grid they kept a few bits (this pool's own error measured 32 dB; in mobilenet_v3_large ~20 dB, the
    worst ops of that net). With qparams of their own: 54 dB here, on every engine."""
    model = se_model("mobilenet_v3")
    lowered, _ = compile_both(model, engine)
    rows = {r.layer: r for r in fxforge.debug.compare(model, lowered, X, attach=False).rows}
    assert rows["avgpool"].local_sqnr_db >= SE_POOL_FLOOR_DB, rows["avgpool"]

"""lower-fbgemm / lower-x86 / lower-qnnpack: int8 kernels that agree with the reference int8 graph."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from quant_helpers import batches, dq_q_round_trips, reference_pipeline, sqnr, toy_model
from torch import fx, nn

import fxforge
from fxforge.backends.int8_packed import PackedWeight
from helpers import reestimate_bn

ENGINES = ["x86", "fbgemm", "qnnpack"]
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))


class InvertedResidual(nn.Module):
    """mobilenet_v2's block: 1x1 expand + relu6, depthwise 3x3 + relu6, 1x1 project, residual add."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU6(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.BatchNorm2d(4 * c), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c), nn.BatchNorm2d(4 * c),
                                nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(4 * c, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(y + self.project(self.dw(self.expand(y))))


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"resnet-like": reestimate_bn(toy_model(), batches(8, seed=100)).eval(),
            "inverted-residual": reestimate_bn(InvertedResidual(), batches(8, seed=101)).eval()}


def compile_both(model: nn.Module, engine: str) -> tuple[fxforge.CompiledModule, fxforge.CompiledModule]:
    calibration = batches(8)
    lowered = fxforge.compile(model, engine, example_inputs=X, calibration=calibration)
    reference = fxforge.compile(model, engine, example_inputs=X, calibration=calibration,
                                pipeline=reference_pipeline(engine))
    return lowered, reference


def output_scale(compiled: fxforge.CompiledModule) -> float:
    return compiled.report.quantization.layers[-1].scale


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["resnet-like", "inverted-residual"])
def test_lowered_kernels_agree_with_the_reference_graph(name, engine):
    model = models()[name]
    lowered, reference = compile_both(model, engine)
    x = batches(1, seed=21)[0]
    with torch.inference_mode():
        steps = ((lowered(x) - reference(x)).abs() / output_scale(reference)).round()
    within_one_step = (steps <= 1).float().mean().item()
    assert within_one_step >= 0.95, f"{name}/{engine}: {within_one_step:.3f} of outputs within one int8 step"
    assert sqnr(model, lowered, x) >= 25


@pytest.mark.parametrize("engine", ENGINES)
def test_lowered_graph_holds_int8_kernels_and_no_round_trips(engine):
    model = models()["inverted-residual"]
    lowered, reference = compile_both(model, engine)
    gm = lowered.graph_module
    assert not dq_q_round_trips(gm)
    assert not [m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    dequantize = [n for n in gm.graph.nodes if n.target == "dequantize"]
    # the global average pool has qparams of its own (its means span a fraction of its input's range): it runs
    # in fp32 between a dequantize and a quantize; elsewhere int8 tensors flow from kernel to kernel
    pool = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                              nn.AdaptiveAvgPool2d)]
    assert len(pool) == 1 and pool[0].args[0] in dequantize and len(dequantize) == 2  # and the output's
    values = _node_values(gm, X, lowered.quant_options.runtime_engine)
    computed = [n for n in gm.graph.nodes if n.op.startswith("call") and n.target != "dequantize" and n not in pool]
    assert computed and all(values[n].is_quantized for n in computed), \
        [n.name for n in computed if not values[n].is_quantized]
    lower = next(p for p in lowered.report.passes if p.name == f"lower-{engine}")
    assert "conv2d" in lower.notes[0] and "add" in lower.notes[0]


def _node_values(gm: fx.GraphModule, x: torch.Tensor, engine: str) -> dict[fx.Node, object]:
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            values[n] = super().run_node(n)
            return values[n]

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with torch.inference_mode():
            Recorder(gm).run(x)
    finally:
        torch.backends.quantized.engine = previous
    return values


def test_each_module_runs_on_its_own_engine_whatever_the_global_engine():
    model = models()["inverted-residual"]
    compiled = {engine: fxforge.compile(model, engine, example_inputs=X, calibration=batches(8))
                for engine in ("fbgemm", "qnnpack")}
    x = batches(1, seed=5)[0]
    expected = {}
    for engine, module in compiled.items():
        torch.backends.quantized.engine = engine
        expected[engine] = module(x)
    for selected in ("qnnpack", "fbgemm", "x86"):
        torch.backends.quantized.engine = selected
        for engine, module in compiled.items():
            assert torch.equal(module(x), expected[engine]), f"{engine} module under global engine {selected}"
        assert torch.backends.quantized.engine == selected  # restored after each call


def test_recalibrate_refreshes_the_kernels_qparams():
    model = models()["resnet-like"]
    lowered = fxforge.compile(model, "fbgemm", example_inputs=X, calibration=batches(6, scale=0.2))
    reference = fxforge.compile(model, "fbgemm", example_inputs=X, calibration=batches(6, scale=0.2),
                                pipeline=reference_pipeline("fbgemm"))
    drifted = batches(6, scale=3.0, seed=3)
    before = sqnr(model, lowered, drifted[0])
    fxforge.recalibrate(lowered, drifted)
    fxforge.recalibrate(reference, drifted)
    assert sqnr(model, lowered, drifted[0]) > before + 3
    with torch.inference_mode():
        steps = ((lowered(drifted[0]) - reference(drifted[0])).abs() / output_scale(reference)).round()
    assert (steps <= 1).float().mean() >= 0.95


def test_lowered_module_survives_deepcopy_and_save_load():
    model = models()["resnet-like"]
    compiled = fxforge.compile(model, "x86", example_inputs=X, calibration=batches(4))
    x = batches(1, seed=9)[0]
    expected = compiled(x)
    assert torch.equal(copy.deepcopy(compiled)(x), expected)
    buffer = io.BytesIO()
    torch.save(compiled.graph_module, buffer)
    buffer.seek(0)
    torch.backends.quantized.engine = "qnnpack"  # unpickling repacks weights: under their own engine, not this
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, fx.GraphModule)
    engines = {name: m.engine for name, m in compiled.graph_module.named_modules() if isinstance(m, PackedWeight)}
    assert engines and engines == {name: m.engine for name, m in loaded.named_modules() if isinstance(m, PackedWeight)}
    torch.backends.quantized.engine = compiled.quant_options.runtime_engine  # what CompiledModule pins
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected)


def test_every_int8_target_is_listed():
    assert {"x86", "fbgemm", "qnnpack"} <= set(fxforge.targets())
    for engine in ENGINES:
        assert fxforge.pipeline_for(engine).endswith(f"insert-qdq,lower-{engine}")


class ResidualReadTwice(nn.Module):
    """conv(conv(y)) + y, then y read again: conv2d_add may write into y's memory, so it must get a copy."""

    def __init__(self, read_again: bool) -> None:
        super().__init__()
        self.read_again = read_again
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        z = torch.relu(self.conv2(self.conv1(y)) + y)
        return self.head(z + y if self.read_again else z)


@pytest.mark.parametrize("read_again", [True, False])
def test_conv_add_never_overwrites_a_residual_read_later(read_again):
    model = ResidualReadTwice(read_again).eval()
    lowered, reference = compile_both(model, "x86")
    code = lowered.graph_module.code
    assert "conv2d_add_relu" in code
    assert ("clone" in code) == read_again
    for x in batches(3, seed=11):
        steps = ((lowered(x) - reference(x)).abs() / output_scale(reference)).round()
        assert (steps <= 1).float().mean() >= 0.95
        assert torch.equal(lowered(x), lowered(x))  # no state left behind between calls

"""fxforge.quant.qspec: pinning torch's process-wide quantized engine (quantized_engine), safely across threads;
the backends' int8 schemes on CPUs without VNNI (backend_quant)."""

from __future__ import annotations

import threading

import pytest
import torch
from quant_helpers import reference_pipeline
from torch import nn

import fxforge
from fxforge.quant import qspec
from fxforge.quant.observers import make_observer
from fxforge.quant.qspec import quantized_engine
from fxforge.quant.sqnr import outputs_sqnr_db
from fxforge.testing import FuzzGraph, FuzzModel, Op

WAIT_S = 10.0  # generous: only reached when the behaviour under test is broken (or the machine is stalled)


def _engine() -> str:
    return torch.backends.quantized.engine


def test_pins_nest_in_one_thread_and_restore_the_callers_engine():
    before = _engine()
    with quantized_engine("fbgemm"):
        assert _engine() == "fbgemm"
        with quantized_engine("qnnpack"):  # a module for another engine called inside
            assert _engine() == "qnnpack"
        assert _engine() == "fbgemm"
        with quantized_engine(None):
            assert _engine() == "fbgemm"
    assert _engine() == before


def test_threads_pinning_the_same_engine_run_together():
    first_in, second_in = threading.Event(), threading.Event()
    overlapped = []

    def first() -> None:
        with quantized_engine("qnnpack"):
            first_in.set()
            overlapped.append(second_in.wait(WAIT_S))  # the second thread gets in while we hold the pin

    def second() -> None:
        first_in.wait(WAIT_S)
        with quantized_engine("qnnpack"):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    assert overlapped == [True]


def test_a_thread_pinning_another_engine_waits_for_the_others():
    holding, other_in = threading.Event(), threading.Event()
    seen = {}

    def holder() -> None:
        with quantized_engine("qnnpack"):
            holding.set()
            seen["other entered while we held qnnpack"] = other_in.wait(1.0)
            seen["engine while held"] = _engine()

    def other() -> None:
        holding.wait(WAIT_S)
        with quantized_engine("fbgemm"):
            other_in.set()
            seen["engine for the other"] = _engine()

    before = _engine()
    threads = [threading.Thread(target=holder), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    assert seen == {"other entered while we held qnnpack": False, "engine while held": "qnnpack",
                    "engine for the other": "fbgemm"}
    assert _engine() == before


# ------------------------------------------------------------------------ backend schemes without VNNI


def test_without_vnni_static_int8_narrows_weights_and_dynamic_int8_activations(monkeypatch):
    """No VNNI: u8 x s8 pair sums saturate int16 unless 2 * max|activation code| * max|weight code| fits. Static
    int8 keeps 8-bit activations (codes up to 255 even beyond the calibrated range) and uses weights in
    [-64, 63]; dynamic int8 quantizes activations per call to 7 bits and keeps 8-bit weights."""
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(4, 3, 8, 8)
    static = fxforge.compile(model, "fbgemm", example_inputs=x, calibration=[x],
                             pipeline=reference_pipeline("fbgemm"))
    summary = static.report.quantization
    assert summary.reduce_range and {r.activation for r in summary.layers} == {"quint8[0,255] per-tensor affine"}
    layers = [m for m in static.graph_module.modules() if hasattr(m, "weight_scale")]
    assert len(layers) == 2
    for layer in layers:
        codes = (layer.weight / layer.weight_scale.view(-1, *[1] * (layer.weight.dim() - 1))).round()
        assert codes.min() >= -64 and codes.max() <= 63 and codes.abs().max() >= 63  # the 7-bit grid, used fully
    dynamic = fxforge.compile(model, "fbgemm", example_inputs=x, quantization="dynamic")
    weights = {r.weight for r in dynamic.report.quantization.layers}
    assert dynamic.report.quantization.reduce_range and weights == {"qint8[-128,127] per-channel(axis=0) symmetric"}


@pytest.mark.parametrize("target", ["x86", "fbgemm"])
def test_without_vnni_no_activation_code_saturates_the_int8_conv(target: str, monkeypatch: pytest.MonkeyPatch):
    """Found by ``make fuzz``. x86 / fbgemm on CPUs without VNNI quantized activations to 7 bits (codes 0-127)
    because AVX2's ``vpmaddubsw`` sums pairs of u8 x s8 products into int16 with saturation. When the
    MSE-optimal range clipped the top of a value's distribution, ``quantize_per_tensor`` still wrote codes up to
    255 for the values above it (it clamps to the dtype, not to 127), and so did the int8 kernels' outputs. The
    reference graph dequantized those codes exactly; fbgemm's conv saturated its int16 pair sums on them (conv4's
    int8 output off by up to 40 codes, lowered graph 5.1 dB from its reference). Fix (qspec.backend_quant):
    without VNNI, static int8 keeps 8-bit activations and narrows the weights to [-64, 63] instead, as ONNX
    Runtime's reduce_range does: ``2 * 255 * 64`` fits int16 whatever the codes, so no input can saturate."""
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)  # the AVX2 scheme on any CPU
    spec = qspec.backend_quant(target)
    assert (spec.activation.quant_max, spec.weight.quant_min, spec.weight.quant_max) == (255, -64, 63)
    graph = FuzzGraph(shape=(1, 3, 3), batch=3, ops=(
        Op("act", (0,), {"fn": "relu", "spelling": "module"}),
        Op("conv", (1,), {"out_channels": 6, "kernel_size": (1, 1), "stride": 1, "padding": "same", "dilation": 1,
                          "groups": 1, "bias": False, "padding_mode": "zeros"}),
        Op("pool", (2,), {"pool": "avg", "spelling": "module", "args": (
            ("kernel_size", 2), ("stride", None), ("padding", 1), ("ceil_mode", False), ("count_include_pad", True),
            ("divisor_override", None))}),
        Op("conv", (3,), {"out_channels": 1, "kernel_size": (1, 1), "stride": 2, "padding": 0, "dilation": 2,
                          "groups": 1, "bias": False, "padding_mode": "zeros"}),
        Op("add", (4, 4), {"spelling": "op"}),
    ), outputs=(5,), seed=128)
    model = FuzzModel(graph)
    data = torch.cat([graph.example(), graph.example(5, seed=2)])
    # the MSE range without its clipping bound: the case needs a clipped range (the bounded default keeps
    # all of these few values)
    clipped = fxforge.QuantConfig(activation=lambda: make_observer("histogram", max_clipped=None))
    lowered = fxforge.compile(model, target, example_inputs=graph.example(), calibration=[data],
                              quant_config=clipped)
    reference = fxforge.compile(model, target, example_inputs=graph.example(), calibration=[data],
                                quant_config=clipped, pipeline=reference_pipeline(target))
    with torch.no_grad():
        assert outputs_sqnr_db(reference(data), lowered(data)) >= 40.0  # 5.1 dB before the fix; now equal

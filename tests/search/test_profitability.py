"""compile(..., profitability=True): layers measured slower in int8 than in fp32 stay fp32 (decision logic
tested with injected timings; the real measurement is only checked for completeness, never for speed)."""

from __future__ import annotations

import importlib

import pytest
import torch
from quant_helpers import batches, sqnr, toy_model
from tiny_bert import tiny_bert

import fxforge
from fxforge.pipeline.report import LayerTiming
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
pytestmark = pytest.mark.skipif(INT8 is None, reason="no int8 engine in this torch build")
X = batches(1, seed=4)[0]
profitability = importlib.import_module("fxforge.search.profitability")


def compile_profitable(model: torch.nn.Module, **kwargs) -> fxforge.CompiledModule:
    return fxforge.compile(model, INT8, example_inputs=X, calibration=batches(4), profitability=True, **kwargs)


def fake_timings(monkeypatch, whole_model_ms: list[float]) -> None:
    """conv2 measured 2x slower in int8, conv1 and fc faster; the whole model takes ``whole_model_ms``."""
    monkeypatch.setattr(profitability, "layer_timings", lambda compiled, inputs, timer: [
        LayerTiming("conv1", "conv2d_relu", 1.0, 2.0), LayerTiming("conv2", "conv2d", 2.0, 1.0),
        LayerTiming("fc", "linear", 1.0, 1.05)])
    times = iter(whole_model_ms)
    monkeypatch.setattr(profitability, "median_seconds", lambda fn: (fn(), next(times) / 1e3)[1])


def test_a_layer_slower_in_int8_moves_to_fp32_when_the_model_gets_faster(monkeypatch):
    fake_timings(monkeypatch, [1.0, 0.8])
    compiled = compile_profitable(toy_model())
    record = compiled.report.profitability
    assert record.fp32_layers == ["conv2"] and compiled.quant_options.skip == ("conv2",)
    assert (record.model_ms_before, record.model_ms_after) == pytest.approx((1.0, 0.8))
    assert "kept in fp32: conv2" in str(compiled.report)
    assert any("conv2" in island for island in compiled.report.quantization.islands)


def test_the_move_is_discarded_when_the_whole_model_is_not_faster(monkeypatch):
    fake_timings(monkeypatch, [1.0, 1.2])
    compiled = compile_profitable(toy_model())
    assert compiled.report.profitability.fp32_layers == [] and compiled.quant_options.skip == ()
    assert "not faster: discarded" in str(compiled.report)


def test_real_measurement_covers_every_int8_kernel():
    model = toy_model()
    compiled = compile_profitable(model)
    timings = compiled.report.profitability.timings
    assert [t.layer for t in timings] == ["conv1", "conv2", "fc"]
    assert all(t.int8_ms > 0 and t.fp32_ms > 0 for t in timings)
    assert sqnr(model, compiled, X) >= 25  # whatever moved to fp32, the model is still right


def test_profitability_with_an_accuracy_budget_keeps_both_records(monkeypatch):
    fake_timings(monkeypatch, [1.0, 0.8])
    compiled = compile_profitable(toy_model(), accuracy=fxforge.AccuracyBudget(min_sqnr_db=15))
    assert compiled.report.accuracy is not None and compiled.report.profitability.fp32_layers == ["conv2"]


def test_profitability_needs_static_int8():
    with pytest.raises(fxforge.ConfigError, match="static int8"):
        fxforge.compile(toy_model(), INT8, example_inputs=X, quantization="dynamic", profitability=True)
    with pytest.raises(fxforge.ConfigError, match="static int8"):
        fxforge.compile(toy_model(), "cpu", example_inputs=X, profitability=True)


def test_real_measurement_takes_keyword_inputs_of_an_exported_bert():
    model, inputs = tiny_bert()
    compiled = fxforge.compile(model, INT8, example_inputs=inputs, calibration=[inputs], profitability=True)
    timings = compiled.report.profitability.timings
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {t.layer for t in timings} <= set(linears) and "pooler.dense" in {t.layer for t in timings}
    assert all(t.int8_ms > 0 and t.fp32_ms > 0 for t in timings)
    assert compiled.report.profitability.model_ms_before > 0
    assert type(compiled(**inputs)) is type(model(**inputs))

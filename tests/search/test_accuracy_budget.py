"""compile(..., accuracy=fxforge.AccuracyBudget(...)): layers move to fp32, most damaging first, until it holds."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_bert import tiny_bert
from torch import nn

import fxforge
from helpers import assert_unchanged, one_intra_op_thread, state_snapshot

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
pytestmark = pytest.mark.skipif(INT8 is None, reason="no int8 engine in this torch build")


class OutlierNet(nn.Module):
    """conv1's channel 0 carries activations ~300 where the others are ~1, and conv2 ignores that channel:
    one int8 scale for conv1's output (quantized as conv1's output *and* as conv2's input) leaves the
    useful channels a handful of levels, so plain static int8 loses most of the signal."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv3, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(torch.relu(self.conv3(y)), 1))


def outlier_net() -> nn.Module:
    torch.manual_seed(0)
    model = OutlierNet().eval()
    with torch.no_grad():
        model.conv1.bias[0] = 300.0
        model.conv2.weight[:, 0] = 0.0
    return model


def data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


CALIBRATION, X, HELD_OUT = data(4, 1), data(1, 2)[0], torch.cat(data(16, 3))
CANDIDATES = ["conv1", "conv2", "conv3", "fc"]


def output_sqnr(model: nn.Module, compiled: nn.Module, x: torch.Tensor = X) -> float:
    with torch.no_grad():
        return fxforge.quant.sqnr.outputs_sqnr_db(model(x), compiled(x))


def compile_int8(model: nn.Module, **kwargs) -> fxforge.CompiledModule:
    return fxforge.compile(model, INT8, example_inputs=X, calibration=CALIBRATION, **kwargs)


def test_the_budget_run_meets_the_budget_with_the_fewest_fp32_layers():
    model = outlier_net()
    snapshot = state_snapshot(model)
    budget = 25.0
    assert output_sqnr(model, compile_int8(model)) < budget  # plain static int8 loses more than the budget
    compiled = compile_int8(model, accuracy=fxforge.AccuracyBudget(min_sqnr_db=budget))
    record = compiled.report.accuracy
    assert output_sqnr(model, compiled) >= budget and record.met and record.after >= budget
    assert sorted(record.fp32_layers) == ["conv1", "conv2"]
    assert sorted(compiled.quant_options.skip) == ["conv1", "conv2"]
    for size in range(len(record.fp32_layers)):  # no smaller set of layers in fp32 meets the budget
        for subset in itertools.combinations(CANDIDATES, size):
            assert output_sqnr(model, compile_int8(model, skip=list(subset))) < budget, subset
    assert [s.layer for s in record.sensitivity][:2] in (["conv1", "conv2"], ["conv2", "conv1"])
    assert record.latency_ms_int8 > 0 and record.latency_ms_final > 0
    text = str(compiled.report)
    assert "accuracy budget: output SQNR >= 25 dB: met" in text and "kept in fp32 to meet it: conv" in text
    assert compiled.report.to_dict()["accuracy"]["fp32_layers"] == record.fp32_layers
    assert_unchanged(model, snapshot)


def test_a_user_metric_with_a_maximum_drop():
    model = outlier_net()
    with torch.no_grad():
        reference = model(HELD_OUT)

    def closeness(module: nn.Module) -> float:
        """1 - relative L2 error against the fp32 outputs on held-out inputs (the fp32 model scores 1)."""
        with torch.no_grad():
            return 1 - ((module(HELD_OUT) - reference).norm() / reference.norm()).item()

    assert closeness(compile_int8(model)) < 0.9
    compiled = compile_int8(model, accuracy=fxforge.AccuracyBudget(metric=closeness, max_drop=0.05))
    assert closeness(compiled) >= 0.95
    record = compiled.report.accuracy
    assert record.met and record.measure.startswith("closeness (fp32: 1)") and record.after >= 0.95
    assert sorted(record.fp32_layers) == ["conv1", "conv2"]


def test_a_budget_the_plain_model_meets_moves_nothing():
    from quant_helpers import toy_model

    model = toy_model()
    compiled = compile_int8(model, accuracy=fxforge.AccuracyBudget(min_sqnr_db=15))
    assert compiled.report.accuracy.fp32_layers == [] and compiled.report.accuracy.compiles == 1
    assert compiled.quant_options.skip == ()
    assert "every quantized layer kept in int8" in str(compiled.report)


def test_an_unreachable_budget_and_bad_budgets_fail_clearly():
    model = outlier_net()
    with pytest.raises(fxforge.AccuracyBudgetError, match="does not hold even with all 2 candidate layers"):
        compile_int8(model, accuracy=fxforge.AccuracyBudget(min_sqnr_db=25, candidates=["conv3", "fc"]))
    with pytest.raises(fxforge.ConfigError, match="needs min_sqnr_db"):
        fxforge.AccuracyBudget()
    with pytest.raises(fxforge.ConfigError, match="go together"):
        fxforge.AccuracyBudget(metric=lambda m: 1.0)
    with pytest.raises(fxforge.ConfigError, match="needs an int8 target"):
        fxforge.compile(model, "cpu", example_inputs=X, accuracy=fxforge.AccuracyBudget(min_sqnr_db=20))


def test_budgets_take_keyword_inputs_and_model_outputs_of_an_exported_bert():
    model, inputs = tiny_bert()
    calibration = [inputs, {k: v.flip(0) for k, v in inputs.items()}]
    compiled = fxforge.compile(model, INT8, example_inputs=inputs, calibration=calibration,
                               accuracy=fxforge.AccuracyBudget(min_sqnr_db=10.0))
    record = compiled.report.accuracy
    assert compiled.report.front_end == "export" and record.met and record.fp32_layers == []
    with torch.no_grad():
        expected, got = model(**inputs), compiled(**inputs)
    assert type(got) is type(expected)
    assert record.after == pytest.approx(fxforge.quant.sqnr.outputs_sqnr_db(expected, got))
    layers = ["pooler.dense", "encoder.layer.1.output.dense"]
    with pytest.raises(fxforge.AccuracyBudgetError, match="most sensitive") as raised:
        fxforge.compile(model, INT8, example_inputs=inputs, calibration=calibration,
                        accuracy=fxforge.AccuracyBudget(min_sqnr_db=record.after + 200.0, candidates=layers))
    assert all(layer in str(raised.value) for layer in layers)

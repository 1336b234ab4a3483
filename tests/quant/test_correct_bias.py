"""correct-bias: empirical bias correction removes the output mean shift that int8 weight rounding causes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxforge
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
pytestmark = pytest.mark.skipif(INT8 is None, reason="no int8 engine in this torch build")


def shifted_mlp(seed: int) -> nn.Module:
    """One row of the first layer weighs 30x the others: per-tensor int8 weights leave the other rows a few
    levels, and on inputs with a large mean their rounding error is mostly a shift of the output mean."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[0].weight[0] *= 30
    return model


def data(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 16, generator=g) * 0.5 + 3


def compile_with(model: nn.Module, correct: bool, calibration) -> fxforge.CompiledModule:
    extra = {"after:insert-qdq": "correct-bias"} if correct else None
    g = torch.Generator().manual_seed(2)
    return fxforge.compile(model, INT8, example_inputs=data(8, g), calibration=calibration, extra_passes=extra,
                           quant_config=fxforge.QuantConfig(per_channel=False))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bias_correction_removes_the_mean_shift(seed):
    model, g = shifted_mlp(seed), torch.Generator().manual_seed(1)
    calibration, held_out = [data(32, g) for _ in range(8)], data(512, g)
    with torch.no_grad():
        expected = model(held_out)
        results = {correct: compile_with(model, correct, calibration) for correct in (False, True)}
        shift = {c: (m(held_out) - expected).mean(0).abs().mean().item() for c, m in results.items()}
        sqnr = {c: outputs_sqnr_db(expected, m(held_out)) for c, m in results.items()}
    assert shift[True] < shift[False] / 5
    assert sqnr[True] > sqnr[False] + 3
    notes = next(p.notes for p in results[True].report.passes if p.name == "correct-bias")
    assert "corrected the bias of 2 layer(s) on 8 calibration batches" in notes[0]
    assert "Linear" not in str(results[True].graph_module)  # lowered to int8 kernels with the new bias


def test_without_readable_calibration_data_the_example_inputs_are_used():
    model, g = shifted_mlp(0), torch.Generator().manual_seed(1)
    compiled = compile_with(model, True, (data(32, g) for _ in range(8)))  # a generator: read once
    notes = next(p.notes for p in compiled.report.passes if p.name == "correct-bias")
    assert "on the example inputs" in notes[0]


def test_bias_correction_needs_the_quantized_graph():
    with pytest.raises(fxforge.PassError, match="requires \\['quantized'\\]"):
        fxforge.compile(shifted_mlp(0), "cpu", example_inputs=torch.randn(2, 16), pipeline="correct-bias")

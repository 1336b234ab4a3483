"""Calibration data (fxforge.quant.calibration): what an item may be (a tensor, a tuple, a dict of forward
arguments, an item with labels), the errors for items that do not fit, and the caller's data left alone."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import ConvFc, batches, compile_reference
from torch import nn

import fxforge

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class WithFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, return_features: bool = False):
        y = self.conv(x)
        return (y, x) if return_features else y


def test_calibration_labels_are_not_fed_to_arguments_bound_at_compile_time():
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    compiled = compile_reference(WithFlag(), X, calibration=loader)
    assert compiled.report.quantization.calibration_batches == 4
    assert fxforge.recalibrate(compiled, loader)  # the kept observed graph knows its inputs too


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_calibration_items_may_be_dicts_of_forward_arguments():
    items = [{"x": x, "y": -x, "label": 0, "names": ["a", "b"]} for x in batches(4, (2, 3, 8, 8))]
    compiled = compile_reference(TwoInputs(), (X, X), calibration=items)
    assert compiled.report.quantization.calibration_batches == 4
    calibrate = next(p for p in compiled.report.passes if p.name == "calibrate")
    assert any("ignored" in note for note in calibrate.notes)


def test_calibration_items_that_do_not_fit_the_model_raise_calibration_errors():
    with pytest.raises(fxforge.CalibrationError, match="1 value.*2 inputs.*x, y"):
        compile_reference(TwoInputs(), (X, X), calibration=batches(4, (2, 3, 8, 8)))
    with pytest.raises(fxforge.CalibrationError, match="no value for 'y'"):
        compile_reference(TwoInputs(), (X, X), calibration=[{"x": X}])
    with pytest.raises(fxforge.CalibrationError, match="calibration batch 0 .*RuntimeError"):
        compile_reference(TwoInputs(), (X, X), calibration=[(torch.randn(2, 5, 8, 8), X)])


def test_calibration_batches_is_checked_like_the_other_quantization_arguments():
    with pytest.raises(fxforge.CalibrationError, match="calibration_batches=2.5"):
        compile_reference(ConvFc(), X, calibration_batches=2.5)
    with pytest.raises(fxforge.ConfigError, match="int8 target"):
        fxforge.compile(ConvFc().eval(), "cpu", example_inputs=X, calibration_batches=4)


class SquaresItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x *= x  # legal in eager: the caller's tensor changes
        return self.conv(x)


def test_calibration_leaves_the_callers_data_alone():
    """Found by the graph fuzzer: calibration ran the model on the caller's own tensors, so a model that changes
    its input in place changed the calibration data (a second compile on the same list calibrated on x*x and
    disagreed with the first). Fix: calibration feeds copies, as compile already did for example_inputs."""
    x = torch.randn(2, 1, 4, 4)
    data = [x.clone(), x.clone()]
    fxforge.compile(SquaresItsInput().eval(), "x86", example_inputs=x.clone(), calibration=data)
    assert all(torch.equal(batch, x) for batch in data)

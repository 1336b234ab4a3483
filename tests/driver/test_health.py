"""Silent degradation made loud: compile warns (fxforge logger and report.warnings) about a ruined int8
output, observers that saw NaN / inf, leaves kept after a failed trace, fp32 islands, unfolded BatchNorms and
forward hooks the compiled model drops."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from quant_helpers import batches, toy_model
from torch import nn

import fxforge
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
needs_int8 = pytest.mark.skipif(INT8 is None, reason="no int8 engine in this torch build")
X = batches(1, seed=7)[0]


def _warnings(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("fxforge") and r.levelno == logging.WARNING and needle in r.getMessage()]


def _one_batch_far_out_of_range() -> list[torch.Tensor]:
    data = batches(4)
    data[1] = data[1] * 1e30
    return data


@needs_int8
def test_a_calibration_batch_far_out_of_range_is_reported_with_the_worst_layer_and_ranges(caplog):
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(toy_model(), INT8, example_inputs=X, calibration=_one_batch_far_out_of_range())
    (logged,) = _warnings(caplog, "below the floor of 10 dB")
    assert "worst layer 'conv" in logged and "widest observer ranges: '<input>' [" in logged and "e+30" in logged
    assert compiled.report.warnings.count(logged) == 1 and f"WARNING: {logged}" in str(compiled.report)
    assert not (compiled.report.quantization.model_sqnr_db >= 10)


@needs_int8
def test_under_verify_numeric_an_output_below_the_floor_raises():
    # good data (every pass keeps verify="numeric"'s own per-pass SQNR floor), an unreachable model floor
    with pytest.raises(fxforge.errors.NumericMismatchError, match="below the floor of 1000 dB.*worst layer"):
        fxforge.compile(toy_model(), INT8, example_inputs=X, calibration=batches(4), verify="numeric",
                        quant_config=fxforge.QuantConfig(min_sqnr_db=1000))


@needs_int8
@pytest.mark.parametrize("floor", [-math.inf, 1000.0])
def test_the_floor_is_an_option(caplog, floor):
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(toy_model(), INT8, example_inputs=X, calibration=batches(4),
                                   quant_config=fxforge.QuantConfig(min_sqnr_db=floor))
    low = _warnings(caplog, "below the floor")
    assert compiled.report.quantization.model_sqnr_db > 20  # good data: only an impossible floor complains
    assert len(low) == (1 if floor > 100 else 0)


class Overflow(nn.Module):
    """A value past float32's range inside the model (finite inputs): the observer after it sees inf."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.exp(self.conv(x) * 200))


@needs_int8
def test_an_observer_that_saw_inf_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(Overflow().eval(), INT8, example_inputs=X, calibration=batches(2))
    (logged,) = _warnings(caplog, "NaN or inf")
    assert "observer(s)" in logged and logged in compiled.report.warnings


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it


class Structure(nn.Module):
    """A leaf kept after a failed trace, two BatchNorms with nothing to fold into, and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in, self.conv, self.odd, self.bn_out = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), Untraceable(), \
            nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_out(self.odd(self.conv(self.bn_in(x))) + 1)


def test_structure_warnings_come_once_per_kind_and_name_the_modules(caplog):
    model = Structure().eval()
    seen = []
    model.conv.register_forward_hook(lambda m, i, o: seen.append("conv"))  # lowered on cpu: dropped
    model.odd.register_forward_hook(lambda m, i, o: seen.append("odd"))  # a leaf: runs
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(model, "cpu", example_inputs=X)
    report = compiled.report
    (leaf,) = _warnings(caplog, "kept as leaves")
    (norms,) = _warnings(caplog, "BatchNorm")
    (hooks,) = _warnings(caplog, "forward hooks")
    assert "odd" in leaf and "bn_in" in norms and "bn_out" in norms and "2 BatchNorm" in norms
    assert "conv" in hooks and "odd" not in hooks
    assert {leaf, norms, hooks} <= set(report.warnings) and report.to_dict()["warnings"] == report.warnings
    seen.clear()
    compiled(X)
    assert seen == ["odd"]  # what the warning says: the conv's hook is gone, the leaf's runs


@needs_int8
def test_fp32_islands_are_one_warning(caplog):
    class Island(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.erf(torch.erf(self.a(x))))  # erf has no int8 kernel

    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(Island().eval(), INT8, example_inputs=X, calibration=batches(2))
    islands = compiled.report.quantization.islands
    logged = _warnings(caplog, "fp32 islands")
    assert islands and len(logged) == 1 and f"{len(islands)} op(s)" in logged[0]


def test_a_search_logs_the_chosen_compiles_warnings_once_not_once_per_candidate(caplog):
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(Structure().eval(), "auto", example_inputs=X)
    candidates = [c for c in compiled.report.auto.candidates if c.ms is not None]
    assert len(candidates) >= 2  # otherwise this would not tell one log per search from one per candidate
    (norms,) = _warnings(caplog, "BatchNorm")
    assert norms in compiled.report.warnings

"""Bad input: every case gets a typed error (fxforge.CompileError subclass) whose message says what to do, and
the user's model is left exactly as it was (state_dict, training flags, submodules). Inputs that are merely
unusual (an empty or identity model, batch sizes other than the example's) compile and run.

Some cases are also covered where their feature lives (test_compile_api, test_tracing, test_quant_passes,
test_calibration, test_cuda_backend); this file is the one table of them all, each with the model check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fxforge
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import assert_unchanged, randomize_bn, rel_error, state_snapshot

X = torch.randn(2, 3, 8, 8)
INT8 = ("x86", "fbgemm", "qnnpack")


class Net(nn.Module):
    """conv-bn-relu, max-pool, flatten, linear-relu, linear: something for every pass to rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow in the root's own forward: no leaf can hold it
            return y
        return -y


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + y


def _net() -> nn.Module:
    return randomize_bn(Net()).eval()


def _exhausted() -> Any:
    batches = iter([X])
    next(batches)
    return batches


def _nan_batch() -> list[torch.Tensor]:
    bad = X.clone()
    bad[0, 0, 0, 0] = math.nan
    return [X, bad]


# (id, model factory, compile kwargs, error type, regex the message must match: what went wrong + what to do)
CASES: list[tuple[str, Callable[[], nn.Module], dict[str, Any], type, str]] = [
    ("train-mode", lambda: randomize_bn(Net()), dict(target="cpu", example_inputs=X),
     fxforge.ConfigError, r"training mode.*call model\.eval\(\)"),
    ("untraceable", lambda: Untraceable().eval(), dict(target="cpu", example_inputs=X),
     fxforge.TraceError, r"cannot trace Untraceable.*if y\.sum\(\) > 0.*concrete_args=.*leaf_modules=.*torch\.where"),
    ("not-a-module", lambda: _net(), dict(model=lambda x: x, target="cpu", example_inputs=X),
     fxforge.ConfigError, r"expects an nn\.Module, got function"),
    ("unknown-target", _net, dict(target="x68", example_inputs=X),
     fxforge.ConfigError, r"unknown target 'x68'\. Did you mean 'x86'\?.*Valid targets"),
    ("target-not-a-name", _net, dict(target=None, example_inputs=X),
     fxforge.ConfigError, r"target must be a target name, got NoneType: use 'auto' or one of cpu"),
    ("no-example-inputs", _net, dict(target="cpu"),
     fxforge.ConfigError, r"needs example_inputs=: a tensor, or a tuple"),
    ("example-too-many-values", _net, dict(target="cpu", example_inputs=(X, X)),
     fxforge.ConfigError, r"example_inputs has 2 values but Net\.forward takes 1.*one value per argument"),
    ("example-too-few-values", lambda: TwoInputs().eval(), dict(target="cpu", example_inputs=X),
     fxforge.ConfigError, r"needs argument 'y'.*one example per forward argument"),
    ("example-wrong-channels", _net, dict(target="cpu", example_inputs=torch.randn(2, 5, 8, 8)),
     fxforge.ConfigError, r"fails on example_inputs with RuntimeError: .*5 channels.*shaped and typed like real data"),
    ("example-wrong-dtype", _net, dict(target="x86", example_inputs=torch.ones(2, 3, 8, 8, dtype=torch.long),
                                       calibration=[X]),
     fxforge.ConfigError, r"fails on example_inputs with RuntimeError: .*long.*shaped and typed like real data"),
    ("calibration-missing", _net, dict(target="x86", example_inputs=X),
     fxforge.CalibrationError, r"needs calibration data: pass calibration=.*quantization='dynamic'"),
    ("calibration-empty-list", _net, dict(target="fbgemm", example_inputs=X, calibration=[]),
     fxforge.CalibrationError, r"calibration data was empty.*give at least one batch"),
    ("calibration-exhausted-generator", _net, dict(target="qnnpack", example_inputs=X, calibration=_exhausted()),
     fxforge.CalibrationError, r"calibration data was empty \(an exhausted generator\?\)"),
    ("calibration-zero-sized-batch", _net, dict(target="x86", example_inputs=X, calibration=[X[:0]]),
     fxforge.CalibrationError, r"saw no calibration data.*add data that exercises them"),
    ("calibration-not-iterable", _net, dict(target="x86", example_inputs=X, calibration=32),
     fxforge.CalibrationError, r"calibration must be an iterable of model inputs .*got int"),
    ("calibration-wrong-channels", _net, dict(target="x86", example_inputs=X, calibration=[torch.randn(2, 5, 8, 8)]),
     fxforge.CalibrationError, r"calibration batch 0 failed in the model with RuntimeError.*like example_inputs"),
    ("calibration-missing-batch-dim", _net, dict(target="x86", example_inputs=X, calibration=[X, X[0]]),
     fxforge.CalibrationError, r"batch 1: input 'x' has shape \(3, 8, 8\), 3 dims where example_inputs had 4"),
    ("calibration-too-few-values", lambda: TwoInputs().eval(),
     dict(target="x86", example_inputs=(X, torch.randn(2, 4, 8, 8)), calibration=[X]),
     fxforge.CalibrationError, r"1 value\(s\) but the model takes 2 inputs \(x, y\): give a tuple"),
    ("calibration-nan", _net, dict(target="x86", example_inputs=X, calibration=_nan_batch()),
     fxforge.CalibrationError, r"batch 1: input 'x' contains NaN or inf values.*torch\.nan_to_num"),
    ("calibration-inf", _net, dict(target="qnnpack", example_inputs=X, calibration=[X * math.inf]),
     fxforge.CalibrationError, r"batch 0: input 'x' contains NaN or inf values"),
    ("calibration-on-fp32-target", _net, dict(target="cpu", example_inputs=X, calibration=[X]),
     fxforge.ConfigError, r"runs in fp32.*need an int8 target: x86, fbgemm or qnnpack"),
]
if not torch.cuda.is_available():
    CASES.append(("target-unavailable-here", _net, dict(target="cuda", example_inputs=X),
                  fxforge.BackendUnavailableError, r"'cuda' cannot run on this machine: no CUDA GPU.*Usable here: cpu"))


@pytest.mark.parametrize(("make_model", "kwargs", "error", "match"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_raises_a_typed_error_and_leaves_the_model_alone(make_model, kwargs, error, match):
    model = make_model()
    snapshot = state_snapshot(model)
    kwargs = dict(kwargs)
    target = kwargs.pop("target", "auto")
    with pytest.raises(error, match=f"(?s){match}") as info:
        fxforge.compile(kwargs.pop("model", model), target, **kwargs)
    assert isinstance(info.value, fxforge.CompileError)
    assert_unchanged(model, snapshot)  # state_dict, every module's training flag, submodules


@pytest.mark.parametrize("target", ["cpu", *INT8])
@pytest.mark.parametrize("model", [nn.Identity(), nn.Sequential(), nn.Sequential(nn.Dropout(), nn.Identity())],
                         ids=["identity", "empty-sequential", "dropout-identity"])
def test_an_empty_or_identity_model_compiles_to_a_no_op(target: str, model: nn.Module):
    model = model.eval()
    kwargs = {} if target == "cpu" else dict(calibration=[X])
    compiled = fxforge.compile(model, target, example_inputs=X, **kwargs)
    ops = [n for n in compiled.graph_module.graph.nodes if n.op not in ("placeholder", "output")]
    assert all(n.target == "contiguous" for n in ops), [n.format_node() for n in ops]  # nothing computed
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(compiled(x), x)


@pytest.mark.parametrize("target", ["cpu", *INT8])
def test_batch_sizes_other_than_the_examples_run(target: str):
    """Compiled at batch 2; a batch of 5 gives eager's results, and its first sample alone (batch 1) or none of
    it (batch 0) give the same rows: no target captures the example's batch size."""
    model = _net()
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    kwargs = {} if target == "cpu" else dict(calibration=calibration)
    compiled = fxforge.compile(model, target, example_inputs=X, **kwargs)
    x = torch.randn(5, 3, 8, 8).clamp(-2.5, 2.5)  # inside the calibrated range
    with torch.no_grad():
        expected = model(x)
    actual = compiled(x)
    assert actual.shape == expected.shape == (5, 4)
    if target == "cpu":
        assert rel_error(actual, expected) <= 1e-4
    else:
        assert outputs_sqnr_db(expected, actual) >= 15
    assert compiled(x[:0]).shape == (0, 4)
    one = compiled(x[:1])
    assert rel_error(one, actual[:1]) <= (1e-5 if target == "cpu" else 0.0), "batch 1 gives other values"

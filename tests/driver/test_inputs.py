"""Typed errors for what a compile cannot take (meta tensors, members deepcopy cannot copy) and for calls
unlike the compiled inputs (another dtype, channel count or device)."""

from __future__ import annotations

import threading

import pytest
import torch
from quant_helpers import batches, toy_model
from torch import nn

import fxforge
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
TARGETS = ["cpu", *([INT8] if INT8 else [])]
X = batches(1, seed=7)[0]


def _compiled(target: str) -> fxforge.CompiledModule:
    extra = {"calibration": batches(2)} if target != "cpu" else {}
    return fxforge.compile(toy_model(), target, example_inputs=X, **extra)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("bad", "error", "what"), [
    (X.double(), fxforge.ConfigError, r"input 0: compiled for 4x3x8x8 float32 on cpu, dtype: got 4x3x8x8 float64"),
    # a static dimension of another size is caught by the call's shape contract before any kernel runs
    (torch.randn(4, 5, 8, 8), fxforge.InputShapeError, r"input 'x' has size 5 in dimension 1, compiled for exactly 3"),
])
def test_a_call_unlike_the_compiled_inputs_says_what_was_compiled(target, bad, error, what):
    compiled = _compiled(target)
    with pytest.raises(error, match=what):
        compiled(bad)
    assert torch.isfinite(compiled(torch.randn(2, 3, 8, 8))).all()  # another batch size is fine


def test_a_failure_with_the_compiled_inputs_is_not_blamed_on_them():
    compiled = _compiled("cpu")

    def broken(*args):
        raise RuntimeError("a kernel bug")

    compiled.graph_module.forward = broken
    with pytest.raises(RuntimeError, match="a kernel bug"):
        compiled(X)


def test_a_model_with_meta_weights_is_refused():
    with torch.device("meta"):
        model = nn.Linear(3, 3).eval()
    with pytest.raises(fxforge.ConfigError, match="meta device.*weight.*load_state_dict"):
        fxforge.compile(model, "cpu", example_inputs=torch.randn(1, 3))


def test_meta_example_inputs_are_refused():
    with pytest.raises(fxforge.ConfigError, match="example input 0 is a meta tensor"):
        fxforge.compile(nn.Linear(3, 3).eval(), "cpu", example_inputs=torch.randn(1, 3, device="meta"))


def test_a_member_deepcopy_cannot_copy_is_named():
    model = toy_model()
    model.conv2.guard = threading.Lock()
    with pytest.raises(fxforge.ConfigError, match=r"cannot be copied .*attribute 'conv2.guard'"):
        fxforge.compile(model, "cpu", example_inputs=X)

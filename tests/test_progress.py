"""Progress bars: one switch (fxforge.progress) decides; silent off a terminal and with progress=False."""

from __future__ import annotations

import torch
from torch import nn

import fxforge
from fxforge import progress


def _int8_compile(capsys, **kwargs) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    data = [torch.randn(1, 3, 8, 8) for _ in range(3)]
    fxforge.compile(model, "x86", example_inputs=data[0], calibration=data, **kwargs)
    return capsys.readouterr().err


def test_bars_follow_the_switch():
    assert progress.disable_flag() is None  # default: tqdm draws only when stderr is a terminal
    with progress.enabled(False):
        assert progress.bar(range(3), desc="x").disable
        with progress.enabled(True):
            assert not progress.bar(range(3), desc="x").disable
            assert progress.bar(range(3), desc="x", show=False).disable
        assert progress.disable_flag() is True
    assert progress.disable_flag() is None


def test_compile_is_silent_off_a_terminal_and_draws_when_asked(capsys):
    assert "calibrating" not in _int8_compile(capsys)  # pytest's stderr is not a terminal
    assert "calibrating" not in _int8_compile(capsys, progress=False)
    assert "calibrating" in _int8_compile(capsys, progress=True)

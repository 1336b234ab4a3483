"""Docs that run: the examples execute end to end and print what they promise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quantize_walkthrough_runs(capsys):
    pytest.importorskip("sklearn")
    load("quantize_walkthrough").main()
    out = capsys.readouterr().out
    for step in ("1. static int8", "2. percentile", "3. dynamic int8 LSTM", "4. QAT then int8", "5. recalibrated"):
        assert step in out
    assert "local dB" in out  # the per-layer report table


def test_custom_pass_example_fuses_hand_written_swish(capsys):
    load("custom_pass").main()
    out = capsys.readouterr().out
    assert "fuse-silu rule mul(x, sigmoid(x)) -> silu(x): 3 match(es)" in out
    assert "conv post-ops:         ['none', 'none', 'none']" in out  # without the pass: nothing to fuse
    assert "conv post-ops:         ['silu', 'silu', 'silu']" in out
    assert "lower-cpu" in out and "fold-bn,fuse-silu,fuse-conv" in out


@pytest.mark.slow
def test_demo_writes_the_text_json_and_html_reports(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)  # the demo writes ./fxforge-report
    load("demo").main()
    assert "x faster" in capsys.readouterr().out
    report = tmp_path / "fxforge-report"
    assert {p.name for p in report.iterdir()} == {"report.txt", "report.json", "report.html"}
    page = (report / "report.html").read_text()
    assert "fold-bn" in page and "Passes" in page

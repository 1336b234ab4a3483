"""benchmarks/bench_int8.py: the OpenVINO int8 peer quantizes with NNCF on the shared calibration batches, and is
skipped, not failed, without nncf; torch's PT2E + Inductor peer and fxforge's openvino-int8 build and compute int8,
not a broken model."""

import importlib.util

import pytest
import torch
from torch import nn


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()


@pytest.mark.parametrize(("peer", "needs"), [("openvino_int8", ("openvino", "nncf")), ("pt2e_inductor", ("torchao",)),
                                             ("fx_openvino_int8", ("openvino",))])
def test_int8_peer_quantizes_on_the_calibration_batches(bench_int8, peer, needs):
    for package in needs:
        pytest.importorskip(package)
    model, x = _tiny(), torch.randn(2, 3, 8, 8)
    calibration = bench_int8.make_calibration(2, 8)
    with torch.no_grad():
        ref = model(x)
    run, cell = bench_int8.build_peer(bench_int8.PEERS[peer], model, x, calibration, ref)
    assert run is not None and cell.error is None and cell.skipped is None, cell.error
    assert cell.sqnr_db > 15  # int8 noise, not a broken model (and fails on NaN)
    assert peer in bench_int8.INT8_PEERS
    assert "openvino" not in bench_int8.INT8_PEERS


def test_openvino_int8_peer_is_skipped_without_nncf(bench_int8, monkeypatch):
    pytest.importorskip("openvino")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nncf" else real_find_spec(name, *a))
    model, x = _tiny(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    calibration = bench_int8.make_calibration(1, 8)
    run, cell = bench_int8.build_peer(bench_int8.PEERS["openvino_int8"], model, x, calibration, ref)
    assert run is None and cell.skipped == "nncf not installed" and cell.error is None
    assert bench_int8.fmt_cell(cell, lambda c: "timed") == "skipped: nncf not installed"



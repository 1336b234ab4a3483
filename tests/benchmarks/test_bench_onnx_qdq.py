"""benchmarks/bench_onnx_qdq.py: the exported peers run fxforge's int8 model in ONNX Runtime and OpenVINO, and agree
with fxforge's own run of it."""

import pytest
import torch
from torch import nn


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()


@pytest.mark.parametrize("peer", ["fx_x86_ort", "fx_fbgemm_ort", "fx_x86_openvino"])
def test_exported_peer_runs_the_int8_model(bench_onnx_qdq, bench_int8, peer):
    pytest.importorskip("onnxscript")
    if peer.endswith("openvino"):
        pytest.importorskip("openvino")
    model, x = _tiny(), torch.randn(1, 3, 8, 8)
    calibration = bench_int8.make_calibration(2, 8)
    with torch.no_grad():
        ref = model(x)
    run, cell = bench_int8.build_peer(bench_onnx_qdq.BUILDERS[peer], model, x, calibration, ref)
    assert run is not None and cell.error is None and cell.skipped is None, cell
    own, own_cell = bench_int8.build_peer(bench_onnx_qdq.BUILDERS["fx_x86"], model, x, calibration, ref)
    assert cell.sqnr_db > 15 and abs(cell.sqnr_db - own_cell.sqnr_db) < 3  # int8 noise, as fxforge's own run


def test_render_has_one_column_per_peer(bench_onnx_qdq, bench_int8):
    row = bench_int8.Row("tiny", 1)
    row.cells = {"eager": bench_int8.QCell(ms=2.0, setup_s=0.0),
                 "fx_x86_ort": bench_int8.QCell(ms=0.5, setup_s=1.0, sqnr_db=30.0)}
    text = bench_onnx_qdq.render([row], ["eager", "fx_x86_ort"], ["- machine: test"])
    assert "| tiny | 1 | 2.00 ms | 0.50 ms (30.0 dB) |" in text

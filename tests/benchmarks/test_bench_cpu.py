"""benchmarks/bench_cpu.py: the fxforge_bf16 peer is skipped (not failed, not timed emulated) without bf16 hardware,
and runs the cpu-bf16 target where the CPU has it; the OpenVINO peers are skipped without openvino."""


import pytest
import torch
from torch import nn

from fxforge.backends.cpu_bf16 import EMULATE_ENV, hardware_unavailable_reason


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def test_bf16_peer_is_skipped_without_bf16_hardware_even_with_the_test_override(bench_cpu, monkeypatch):
    if hardware_unavailable_reason() is None:
        pytest.skip("this CPU has AMX or AVX512-BF16")
    monkeypatch.setenv(EMULATE_ENV, "1")  # the override makes the target usable, the benchmark still skips it
    x = torch.randn(1, 3, 8, 8)
    run, cell = bench_cpu.build_peer(bench_cpu.PEERS["fxforge_bf16"], _tiny(), x, _tiny()(x))
    assert run is None and cell.skipped == "no AMX/AVX512-BF16" and cell.error is None
    assert bench_cpu.fmt_cell(cell, lambda c: "timed") == "skipped: no AMX/AVX512-BF16"


def test_bf16_peer_runs_where_the_cpu_has_bf16(bench_cpu):
    if hardware_unavailable_reason() is not None:
        pytest.skip(hardware_unavailable_reason())
    model, x = _tiny(), torch.randn(1, 3, 8, 8)
    run, cell = bench_cpu.build_peer(bench_cpu.PEERS["fxforge_bf16"], model, x, model(x))
    assert run is not None and cell.error is None and cell.rel_err < 0.05


def test_the_int8_benchmark_keeps_its_own_default_models(bench_cpu, monkeypatch):
    """bench_int8 shares bench_cpu's argument parser; it ran vit_b_16 at batch 32 through every int8 peer once
    bench_cpu's default models grew it."""
    import bench_int8

    assert bench_int8.parse_args([]).models == bench_int8.DEFAULT_MODELS != bench_cpu.DEFAULT_MODELS
    assert bench_int8.parse_args(["--models", "resnet18"]).models == "resnet18"


@pytest.mark.parametrize("peer", ["openvino", "fx_openvino"])
def test_openvino_peers_are_skipped_when_openvino_is_not_installed(bench_cpu, monkeypatch, peer):
    real_find_spec = bench_cpu.importlib.util.find_spec
    monkeypatch.setattr(bench_cpu.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    x = torch.randn(1, 3, 8, 8)
    run, cell = bench_cpu.build_peer(bench_cpu.PEERS[peer], _tiny(), x, _tiny()(x))
    assert run is None and cell.skipped == "openvino not installed" and cell.error is None


def test_fx_openvino_peer_matches_eager(bench_cpu):
    pytest.importorskip("openvino")
    model, x = _tiny(), torch.randn(1, 3, 8, 8)
    run, cell = bench_cpu.build_peer(bench_cpu.PEERS["fx_openvino"], model, x, model(x))
    assert run is not None and cell.error is None and cell.rel_err < 1e-4


def test_openvino_peer_runs_in_fp32_at_torchs_thread_count(bench_cpu):
    pytest.importorskip("openvino")
    model, x = _tiny(), torch.randn(1, 3, 8, 8)
    compiled = bench_cpu.openvino_compiled(bench_cpu.openvino_model(model, x))
    assert compiled.get_property("INFERENCE_NUM_THREADS") == torch.get_num_threads()
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    run, cell = bench_cpu.build_peer(bench_cpu.PEERS["openvino"], model, x, model(x))
    assert run is not None and cell.error is None and cell.rel_err < 1e-4

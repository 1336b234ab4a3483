"""benchmarks/openvino_profile.py: both engines' executed layers, matched compute layers, and the differences."""

import pytest
import torch
from torch import nn


def _layer(profile, type_: str, kernel: str, out: str = "u8", shape: str = "[1,8,4,4]", us: float = 1.0):
    return profile.Layer(f"{type_}_{us}", type_, kernel, out, shape, ("conv", "QuantizeLinear"), us)


def test_names_of_fused_ops_lose_path_prefix_and_numbering(openvino_profile):
    assert openvino_profile.op_name("node_silu_3") == "silu"
    assert openvino_profile.op_name("__module.features.0.2/aten::silu_/Swish") == "Swish"
    assert openvino_profile.op_name("x/fq_output_0") == "fq_output"


def test_differences_name_the_compute_layers_and_the_layers_between_them(openvino_profile):
    p = openvino_profile
    conv, reorder = ("Convolution", "brgconv_avx512_I8"), ("Reorder", "jit_uni_I8")
    a = p.Profile("fx_x86", [_layer(p, *conv), _layer(p, "Subgraph", "jit_avx512_f32"), _layer(p, *conv, out="f32"),
                             _layer(p, *reorder)])
    b = p.Profile("nncf", [_layer(p, *conv), _layer(p, *conv), _layer(p, *reorder)])
    text = "\n".join(p.diff_tables(a, b))
    assert "Compute layers that differ (1 of 2)" in text and "| 1 | [1,8,4,4] | Convolution[" in text
    assert "stretches" in text and "| before #1 | Subgraph[jit_avx512_f32]" in text
    assert "after the last" not in text  # the same Reorder follows both
    kinds = "\n".join(p.kind_table(a, b))
    assert "| Convolution [brgconv_avx512_I8] | 2 / 2 | 2 / 2 |" in kinds
    assert "| Subgraph [jit_avx512_f32] | 1 / 1 | - |" in kinds


def test_both_engines_run_the_tiny_model_on_int8_kernels(openvino_profile, bench_int8):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    models = openvino_profile.ov_models(model, x, bench_int8.make_calibration(2, 8))
    results = openvino_profile.profiles(models, x, forwards=2, rounds=1, block=1)
    assert set(results) == {*openvino_profile.ENGINES, openvino_profile.DYNAMIC}
    for name in openvino_profile.ENGINES:
        computes = [layer for layer in results[name].layers if layer.compute]
        assert len(computes) == 3, (name, computes)  # two convs and the linear
        assert all("i8" in layer.kernel.lower() for layer in computes), (name, computes)
    assert all(r.cpu_ms > 0 and r.wall_ms > 0 for r in results.values())
    text = openvino_profile.render("tiny", results)
    assert "| fx_x86 dynamic batch |" in text and "Compute layers that differ" in text

"""benchmarks/breakdown.py: each engine's time split into categories, with call counts that match the model."""

import importlib.util

import pytest
import torch
from torch import nn


class Tiny(nn.Module):
    """Two convs (one feeding a residual add) and a linear: three kernels per forward in every engine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(("name", "expected"), [
    ("mkldnn::_convolution_pointwise", "kernel"), ("quantized::conv2d", "kernel"), ("FusedConv", "kernel"),
    ("onednn::qlinear_pointwise", "kernel"), ("GroupConvolution", "kernel"), ("Gemm", "kernel"),
    ("aten::quantize_per_tensor", "quantize/dequantize"), ("DequantizeLinear", "quantize/dequantize"),
    ("aten::copy_", "layout"), ("Reorder", "layout"), ("ReorderOutput", "layout"),
    ("aten::conv2d", "dispatch/alloc"), ("aten::empty", "dispatch/alloc"), ("aten::relu", "other ops"),
    ("QLinearAdd", "other ops"), ("QLinearConv", "kernel"), ("aten::_empty_affine_quantized", "dispatch/alloc"),
])
def test_ops_fall_into_their_category(breakdown, name, expected):
    assert breakdown.category(name) == expected


def test_each_engine_is_split_into_categories_with_the_models_kernel_calls(breakdown, capsys):
    engines = breakdown.ENGINES if importlib.util.find_spec("openvino") else ("fxforge", "ort")
    x = torch.randn(1, 3, 8, 8)
    results = breakdown.breakdowns(Tiny().eval(), x, "cpu", engines, forwards=2)
    assert set(results) == set(engines)
    kernels = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in Tiny().modules())
    for name, b in results.items():
        assert isinstance(b, breakdown.Breakdown), f"{name}: {b}"
        assert list(b.categories) == [c for c in breakdown.ORDER if c in b.categories]
        assert b.categories["kernel"].calls == kernels, (name, b.ops)
        assert b.categories[breakdown.OVERHEAD].ms >= 0 and b.wall_ms > 0 and b.profiled_ms > 0
        ops_ms = sum(op.ms for op in b.ops.values())
        assert sum(c.ms for c in b.categories.values()) == pytest.approx(max(b.profiled_ms, ops_ms))
    assert results["fxforge"].graph_calls == sum(
        n.op.startswith("call_") for n in breakdown.fxforge.compile(Tiny().eval(), "cpu", example_inputs=x)
        .graph_module.graph.nodes)
    text = breakdown.render("tiny", results, rows=3)
    header = text.splitlines()[2]
    assert header == "| category | " + " | ".join(f"{e} ms (calls)" for e in engines) + " |"
    assert "| **wall, unprofiled** |" in text and text.count("| fxforge op |") == 1


def test_an_engine_that_is_not_installed_is_left_out_with_the_reason(breakdown, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    results = breakdown.breakdowns(Tiny().eval(), torch.randn(1, 3, 8, 8), "cpu", ("openvino",), forwards=1)
    assert results == {"openvino": "left out: openvino not installed"}
    assert "- openvino: left out: openvino not installed" in breakdown.render("tiny", results, rows=3)

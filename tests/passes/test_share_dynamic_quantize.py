"""Sibling dynamic int8 linears (one input, one quantize each) merge into one linear: same outputs, fewer kernels."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import reference_pipeline
from torch import nn

import fxforge
from fxforge.pipeline.fragments import with_options
from fxforge.quant.reference import dynamic_quantize


class Attention(nn.Module):
    """Q, K and V read one tensor (one without bias); ``out`` reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16, bias=False), nn.Linear(32, 24)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        mixed = torch.cat([q[..., :8] * k[..., :8], v[..., :24]], -1)
        return self.out(torch.relu(mixed))


def compile_pair(pipeline: str, **options: object) -> tuple[fxforge.CompiledModule, fxforge.CompiledModule]:
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 7, 32)
    apart = with_options(pipeline, "quantize-dynamic", share_quantize=False)
    return (fxforge.compile(model, "x86", example_inputs=x, quantization="dynamic", pipeline=pipeline, **options),
            fxforge.compile(model, "x86", example_inputs=x, quantization="dynamic", pipeline=apart, **options))


def calls(compiled: fxforge.CompiledModule, target: object) -> int:
    return sum(n.target is target for n in compiled.graph_module.graph.nodes)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_shared_quantize_computes_the_same_on_the_int8_kernels(per_channel):
    config = fxforge.QuantConfig(per_channel=per_channel)
    shared, apart = compile_pair(fxforge.pipeline_for("x86", "dynamic"), quant_config=config)
    linear_dynamic = torch.ops.quantized.linear_dynamic
    assert (calls(shared, linear_dynamic), calls(apart, linear_dynamic)) == (2, 4)  # q, k, v -> one; out
    assert any("2 linears merged" in n for p in shared.report.passes for n in p.notes)
    x = torch.randn(3, 7, 32) * 4
    with torch.inference_mode():
        torch.testing.assert_close(shared(x), apart(x), rtol=1e-5, atol=1e-6)


def test_shared_quantize_computes_the_same_in_the_reference_graph():
    shared, apart = compile_pair(reference_pipeline("x86", "dynamic"))
    assert (calls(shared, dynamic_quantize), calls(apart, dynamic_quantize)) == (2, 4)
    merged = shared.graph_module.get_submodule("q_k_v")
    assert merged.weight_scale.shape == (32 + 16 + 24,) and merged.bias[32:48].eq(0).all()
    x = torch.randn(3, 7, 32)
    with torch.inference_mode():
        torch.testing.assert_close(shared(x), apart(x), rtol=0, atol=0)
    assert [r.layer for r in shared.report.quantization.layers] == ["q", "k", "v", "out"]  # reported per layer

"""fxforge.prepare_qat then compile: the int8 model reproduces the trained QAT model's eval output (per-layer
settings, no VNNI, requantization after pooling)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import reference_pipeline
from torch import nn

import fxforge
from fxforge.quant import qspec

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class QatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.c2(y) + y
        return self.fc(torch.flatten(F.max_pool2d(y, 2), 1))


def trained_qat(target: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    qat = fxforge.prepare_qat(QatNet(), target, example_inputs=X, **kwargs)
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(20):
        loss = qat(torch.randn(8, 3, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat.eval()


def test_compiled_qat_model_reproduces_its_eval_output_without_vnni(monkeypatch):
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)  # fbgemm/x86 use reduce_range on such CPUs
    qat = trained_qat("x86")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 3  # beyond the trained ranges
    compiled = fxforge.compile(qat, "x86", example_inputs=x, pipeline=reference_pipeline("x86"))
    assert compiled.report.quantization.reduce_range
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-4, atol=1e-5)


def test_prepare_qat_follows_per_channel_setting_and_compile_reproduces_it():
    config = fxforge.QuantConfig(per_channel=False).for_name("fc", per_channel=True)
    qat = trained_qat("qnnpack", quant_config=config)
    specs = {name: m.weight_spec for name, m in qat.named_modules() if hasattr(m, "weight_spec")}
    assert specs["c1"].axis is None and specs["c2"].axis is None and specs["fc"].axis == 0
    x = torch.randn(8, 3, 8, 8)
    compiled = fxforge.compile(qat, "qnnpack", example_inputs=x, quant_config=config,
                               pipeline=reference_pipeline("qnnpack"))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-4, atol=1e-5)


class PooledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        # a windowed pool (adaptive ones have qparams of their own): requantized with its input's qparams
        return self.fc(torch.flatten(F.avg_pool2d(torch.relu(self.bn(self.conv(x))), 8), 1))


def test_qat_simulates_the_requantization_after_average_pooling():
    torch.manual_seed(0)
    qat = fxforge.prepare_qat(PooledNet(), "qnnpack", example_inputs=X)
    for _ in range(5):
        qat(torch.randn(8, 3, 8, 8))
    qat.eval()
    assert any(type(m).__name__ == "SharedFakeQuantize" for m in qat.modules())
    x = torch.randn(8, 3, 8, 8)
    compiled = fxforge.compile(qat, "qnnpack", example_inputs=x,  # requantizes the pooled value
                               pipeline=reference_pipeline("qnnpack"))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-4, atol=1e-5)


def test_prepare_qat_takes_positional_example_inputs_in_any_accepted_form_and_refuses_keywords():
    as_tensor = fxforge.prepare_qat(QatNet(), "x86", example_inputs=X)
    as_list = fxforge.prepare_qat(QatNet(), "x86", example_inputs=[X])
    assert [n.op for n in as_tensor.graph.nodes] == [n.op for n in as_list.graph.nodes]
    with pytest.raises(fxforge.ConfigError, match=r"\['x'\].*as a tuple"):
        fxforge.prepare_qat(QatNet(), "x86", example_inputs={"x": X})

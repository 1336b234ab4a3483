"""quantize-dynamic: dynamic int8 (Linear, LSTM, GRU) and weight-only int8 (Linear, Embedding)."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import reference_pipeline, sqnr
from torch import nn

import fxforge
from fxforge.backends.int8_rnn import DynamicInt8RNN
from fxforge.pipeline.fragments import with_options
from fxforge.quant.reference import DynamicQuantLSTM, dynamic_quantize
from helpers import assert_unchanged, state_snapshot


class TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(24, 32), nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.fc2(torch.relu(self.fc1(out[:, -1])))


TOKENS = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))


def int8_rnns(pipeline: str) -> str:
    """``pipeline`` with the RNN layers that hold int8 kept int8 (not replaced by bf16 where that is timed faster)."""
    return with_options(pipeline, "quantize-dynamic", time_rnn_layers=False)


def compile_text(mode: str, **kwargs) -> tuple[nn.Module, fxforge.CompiledModule]:
    """The reference graph of ``mode`` (the lowering to int8 kernels is tested on its own below)."""
    torch.manual_seed(0)
    model = TextModel().eval()
    pipeline = reference_pipeline("x86", mode)
    return model, fxforge.compile(model, "x86", example_inputs=TOKENS, quantization=mode,
                                  pipeline=int8_rnns(pipeline) if mode == "dynamic" else pipeline, **kwargs)


def test_dynamic_quantizes_linear_inputs_per_call_and_rnn_weights():
    model, compiled = compile_text("dynamic")
    gm = compiled.graph_module
    dynamic_calls = [n for n in gm.graph.nodes if n.target is dynamic_quantize]
    assert len(dynamic_calls) == 2  # one per Linear
    assert isinstance(gm.get_submodule("rnn"), DynamicQuantLSTM)
    assert hasattr(gm.get_submodule("fc2"), "weight_scale")
    assert not hasattr(gm.get_submodule("embed"), "weight_scale")  # dynamic mode leaves embeddings alone
    assert sqnr(model, compiled, TOKENS) > 25
    layers = {r.layer: r for r in compiled.report.quantization.layers}
    assert {"rnn", "fc2"} <= set(layers) and all(r.sqnr_db is not None for r in layers.values())
    assert compiled.report.quantization.mode == "dynamic"


def test_weight_only_quantizes_linear_and_embedding_weights_only():
    model, compiled = compile_text("weight-only")
    gm = compiled.graph_module
    assert not [n for n in gm.graph.nodes if n.target is dynamic_quantize]
    embed = gm.get_submodule("embed")
    ints = embed.weight / embed.weight_scale[:, None]
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert isinstance(gm.get_submodule("rnn"), nn.LSTM)  # RNNs need dynamic mode
    assert sqnr(model, compiled, TOKENS) > 30


def test_dynamic_needs_no_calibration_and_does_not_touch_the_model():
    torch.manual_seed(0)
    model = TextModel().eval()
    snapshot = state_snapshot(model)
    fxforge.compile(model, "qnnpack", example_inputs=TOKENS, quantization="dynamic")
    assert_unchanged(model, snapshot)


def test_dynamic_skip_keeps_the_layer_fp32():
    _, compiled = compile_text("dynamic", skip=["rnn"])
    assert isinstance(compiled.graph_module.get_submodule("rnn"), nn.LSTM)


def test_recalibrate_rejects_dynamic_models():
    _, compiled = compile_text("dynamic")
    with pytest.raises(fxforge.CalibrationError, match="static"):
        fxforge.recalibrate(compiled, [TOKENS])


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "qnnpack"])
def test_dynamic_lowering_uses_int8_kernels_that_match_the_reference(engine):
    torch.manual_seed(0)
    model = TextModel().eval()
    lowered = fxforge.compile(model, engine, example_inputs=TOKENS, quantization="dynamic",
                              pipeline=int8_rnns(fxforge.pipeline_for(engine, "dynamic")))
    reference = fxforge.compile(model, engine, example_inputs=TOKENS, quantization="dynamic",
                                pipeline=int8_rnns(reference_pipeline(engine, "dynamic")))
    gm = lowered.graph_module
    assert [n.target for n in gm.graph.nodes].count(torch.ops.quantized.linear_dynamic) == 2
    assert isinstance(gm.get_submodule("rnn"), DynamicInt8RNN)
    tokens = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.allclose(lowered(tokens), reference(tokens), atol=1e-5)


@pytest.mark.parametrize("mode", ["dynamic"])  # weight-only: tests/passes/test_weight_only.py
def test_dynamic_modes_follow_the_per_channel_setting(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LSTM(16, 8, batch_first=True)).eval()
    config = fxforge.QuantConfig(per_channel=False)
    compiled = fxforge.compile(model, "x86", example_inputs=torch.randn(2, 5, 8), quantization=mode,
                               quant_config=config, pipeline=reference_pipeline("x86", mode))
    assert compiled.graph_module.get_submodule("0").weight_scale.numel() == 1
    assert all("per-tensor" in r.weight for r in compiled.report.quantization.layers)

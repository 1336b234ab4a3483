"""quantize-dynamic keeps accuracy on trained recurrent models: each layer at the first scheme that holds."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import reference_pipeline, sqnr
from torch import nn

import fxforge
from fxforge.backends.int8_rnn import DynamicInt8RNN
from fxforge.passes.quantize_dynamic import Bf16RNN
from fxforge.pipeline.fragments import with_options
from fxforge.quant.qspec import backend_quant
from fxforge.quant.reference import DynamicQuantLSTM, dynamic_quantize
from fxforge.quant.runtime import runtime_for
from fxforge.testing.speech import trained_speech_embedder

PLAIN_INT8 = with_options(fxforge.pipeline_for("x86", "dynamic"), "quantize-dynamic", min_layer_sqnr_db=-1000,
                          time_rnn_layers=False)
KINDS = pytest.mark.parametrize("kind", [{}, {"rnn": "gru"}, {"bidirectional": True}], ids=["lstm", "gru", "bilstm"])


def min_cosine(model: nn.Module, compiled: nn.Module, frames: torch.Tensor) -> float:
    with torch.inference_mode():
        return F.cosine_similarity(model(frames), compiled(frames)).min().item()


@pytest.fixture(scope="module")
def speech_lstm() -> tuple[nn.Module, torch.Tensor]:
    return trained_speech_embedder(0)


def test_the_trained_stand_in_breaks_under_plain_int8(speech_lstm, caplog):
    model, frames = speech_lstm
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(model, "x86", example_inputs=frames[:8], quantization="dynamic",
                                   pipeline=PLAIN_INT8)
    assert min_cosine(model, compiled, frames) < 0.9  # what upstream dynamic int8 does to it
    assert any("SQNR" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@KINDS
def test_default_dynamic_keeps_the_embedding(kind, speech_lstm, caplog):
    model, frames = speech_lstm if not kind else trained_speech_embedder(0, **kind)
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = fxforge.compile(model, "x86", example_inputs=frames[:8], quantization="dynamic")
    cosine = min_cosine(model, compiled, frames)
    assert not (cosine < 0.98), cosine
    schemes = split_schemes(compiled.graph_module.get_submodule("rnn"), type(model.rnn))
    assert len(schemes) == model.rnn.num_layers and schemes[0] != "int8"  # int8 measured far below the floor
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (record,) = [r for r in compiled.report.quantization.layers if r.node == "rnn"]
    assert record.layer == "rnn"
    assert all(f"l{i} {scheme} (" in record.weight for i, scheme in enumerate(schemes)), record.weight


@KINDS
def test_each_scheme_alone_holds_the_floor_on_the_stand_ins(kind):
    model, frames = trained_speech_embedder(0, **kind)
    bf16 = copy.deepcopy(model)
    bf16.rnn = Bf16RNN(model.rnn)  # every layer in bf16
    cosine = min_cosine(model, bf16, frames)
    assert not (cosine < 0.98), cosine
    untimed = with_options(fxforge.pipeline_for("x86", "dynamic"), "quantize-dynamic", time_rnn_layers=False)
    int8 = fxforge.compile(model, "x86", example_inputs=frames[:8], quantization="dynamic", pipeline=untimed)
    schemes = split_schemes(int8.graph_module.get_submodule("rnn"), type(model.rnn))
    assert schemes[1:] == ["int8", "int8"]  # int8 wherever it holds (not the layer reading the power frames)
    cosine = min_cosine(model, int8, frames)
    assert not (cosine < 0.98), cosine


def split_schemes(parts: nn.Module, fp32: type[nn.Module]) -> list[str]:
    """Each layer's scheme in a stack split into parts (fp32: the RNN kind as it was)."""
    schemes = []
    for part in parts:
        rnn = part.rnn if isinstance(part, Bf16RNN) else part
        if isinstance(part, DynamicInt8RNN):
            schemes += list(part.layer_schemes)
        else:
            assert type(rnn) is fp32
            schemes += ["bf16" if isinstance(part, Bf16RNN) else "fp32"] * rnn.num_layers
    return schemes


def test_a_floor_no_scheme_holds_keeps_the_stack_fp32(speech_lstm):
    model, frames = speech_lstm
    strict = with_options(fxforge.pipeline_for("x86", "dynamic"), "quantize-dynamic", min_layer_sqnr_db=200)
    compiled = fxforge.compile(model, "x86", example_inputs=frames[:8], quantization="dynamic", pipeline=strict)
    assert split_schemes(compiled.graph_module.get_submodule("rnn"), nn.LSTM) == ["fp32"] * 3
    with torch.inference_mode():
        torch.testing.assert_close(compiled.graph_module.rnn[0](frames)[0], model.rnn(frames)[0])


def test_the_int8_candidate_is_timed_as_the_backend_runs_it(speech_lstm):
    reference = DynamicQuantLSTM.from_float(speech_lstm[0].rnn, backend_quant("x86").dynamic, False)
    assert isinstance(runtime_for(reference, "x86"), DynamicInt8RNN)
    assert runtime_for(nn.Linear(2, 2), "x86") is None


class WithState(nn.Module):
    """The speech stack called with an explicit initial state: it cannot be split into parts."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.rnn, self.proj = embedder.rnn, embedder.proj

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h0 = frames.new_zeros(self.rnn.num_layers, frames.shape[0], self.rnn.hidden_size)
        out, _ = self.rnn(frames, (h0, h0))
        return F.normalize(torch.relu(self.proj(out[:, -1])), dim=-1)


def test_a_stack_called_with_a_state_keeps_fp16_layers(speech_lstm):
    model, frames = WithState(speech_lstm[0]).eval(), speech_lstm[1]
    compiled = fxforge.compile(model, "x86", example_inputs=frames[:8], quantization="dynamic")
    rnn = compiled.graph_module.get_submodule("rnn")
    assert isinstance(rnn, DynamicInt8RNN) and rnn.layer_schemes == ("fp16", "int8", "int8")
    cosine = min_cosine(model, compiled, frames)
    assert not (cosine < 0.98), cosine


def test_lowered_mixed_stack_matches_its_reference(speech_lstm):
    model, frames = speech_lstm

    def untimed(pipeline: str) -> str:  # l0 fails int8 and bf16 at 45 dB (fp32), l1 and l2 hold int8
        return with_options(pipeline, "quantize-dynamic", min_layer_sqnr_db=45, time_rnn_layers=False)

    reference = fxforge.compile(model, "x86", example_inputs=frames[:8], quantization="dynamic",
                                pipeline=untimed(reference_pipeline("x86", "dynamic")))
    lowered = fxforge.compile(model, "x86", example_inputs=frames[:8], quantization="dynamic",
                              pipeline=untimed(fxforge.pipeline_for("x86", "dynamic")))
    assert type(reference.graph_module.get_submodule("rnn.0")) is nn.LSTM
    assert isinstance(reference.graph_module.get_submodule("rnn.1"), DynamicQuantLSTM)
    assert isinstance(lowered.graph_module.get_submodule("rnn.1"), DynamicInt8RNN)
    assert not (sqnr(reference, lowered, frames) < 40)


class Outliers(nn.Module):
    """A linear whose inputs carry one channel a thousand times louder than the rest (read by small weights,
    as trained layers learn: the quiet channels carry as much of the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        with torch.no_grad():
            self.fc.weight[:, 0] *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * torch.tensor([1000.0] + [1.0] * 15))


def test_linear_with_outlier_channels_is_equalized():
    torch.manual_seed(0)
    model, x = Outliers().eval(), torch.randn(32, 16)
    plain = fxforge.compile(model, "x86", example_inputs=x, quantization="dynamic", pipeline=PLAIN_INT8)
    smoothed = fxforge.compile(model, "x86", example_inputs=x, quantization="dynamic",
                               pipeline=reference_pipeline("x86", "dynamic"))
    (record,) = smoothed.report.quantization.layers
    assert "int8+smooth" in record.weight
    gm = smoothed.graph_module
    (quantize,) = [n for n in gm.graph.nodes if n.target is dynamic_quantize]
    assert quantize.args[0].target is torch.mul  # x / s before the per-call quantization
    assert sqnr(model, smoothed, x) > sqnr(model, plain, x) + 6


def test_layers_below_the_floor_even_when_smoothed_stay_fp32():
    torch.manual_seed(0)
    model, x = Outliers().eval(), torch.randn(32, 16)
    strict = with_options(reference_pipeline("x86", "dynamic"), "quantize-dynamic", min_layer_sqnr_db=200)
    compiled = fxforge.compile(model, "x86", example_inputs=x, quantization="dynamic", pipeline=strict)
    assert not [n for n in compiled.graph_module.graph.nodes if n.target is dynamic_quantize]
    assert compiled.report.quantization.layers[0].weight.startswith("fp32")
    torch.testing.assert_close(compiled(x), model(x))


def test_transformers_conv1d_becomes_a_dynamic_linear():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(24, 16), nn.ReLU()).eval()
    x = torch.randn(2, 5, 16)
    compiled = fxforge.compile(model, "x86", example_inputs=x, quantization="dynamic", leaf_modules=[conv1d])
    gm = compiled.graph_module
    assert torch.ops.quantized.linear_dynamic in [n.target for n in gm.graph.nodes]
    assert not (sqnr(model, compiled, x) < 30)

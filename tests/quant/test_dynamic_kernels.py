"""quant.dynamic_kernels: torch's dynamic int8 kernels in plain ops, bit for bit against the kernels (fbgemm,
x86) on the shapes and values that take different paths (row tails, bf16-valued inputs full of rounding ties)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxforge.api  # noqa: F401  (registers the backends' runtime modules)
from fxforge.backends.int8_rnn import DynamicInt8RNN
from fxforge.quant.deprecation import quantized_tensors_quietly
from fxforge.quant.dynamic_kernels import choose_qparams, dynamic_linear, int8_parts
from fxforge.quant.qspec import backend_quant, quantized_engine
from fxforge.quant.reference import DynamicQuantGRU, DynamicQuantLSTM

ENGINES = [e for e in ("x86", "fbgemm") if e in torch.backends.quantized.supported_engines]


def int8_weight(rows: int, columns: int, per_channel: bool, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, columns, generator=generator)
    with quantized_tensors_quietly():
        if per_channel:
            return torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(rows, dtype=torch.long), 0,
                                              torch.qint8)
        return torch.quantize_per_tensor(w, float(w.abs().max() / 127), 0, torch.qint8)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (3, 7), (4, 20, 40), (32, 256)])
def test_linear_is_the_kernel_bit_for_bit(engine, reduce_range, per_channel, shape):
    g = torch.Generator().manual_seed(sum(shape))
    weight, bias = int8_weight(24, shape[-1], per_channel, g), torch.randn(24, generator=g)
    for x in (torch.randn(shape, generator=g) * 3 + 0.5,  # and bf16 values: ties in x / scale
              torch.randn(shape, generator=g).to(torch.bfloat16).float()):
        with quantized_engine(engine):
            expected = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(weight, bias),
                                                          reduce_range)
        assert torch.equal(dynamic_linear(x, *int8_parts(weight), bias, reduce_range), expected)


def test_qparams_are_atens():
    for x in (torch.randn(50) * 4 + 1, torch.rand(10) + 2, -torch.rand(10), torch.zeros(5), torch.randn(9) * 1e-6):
        scale, zero_point = choose_qparams(x, False)
        with quantized_tensors_quietly():
            q = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
        # torch keeps the float64 scale on the tensor; the kernels compute with its float32 rounding
        assert float(scale) == float(torch.tensor(q.q_scale()).float()) and int(zero_point) == q.q_zero_point(), x


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize(("hidden", "batch", "bidirectional"), [(24, 1, False), (24, 3, True), (64, 4, True)])
def test_rnn_export_form_is_the_kernel_bit_for_bit(engine, kind, hidden, batch, bidirectional, monkeypatch):
    torch.manual_seed(hidden + batch)
    rnn = kind(40, hidden, 2, batch_first=True, bidirectional=bidirectional).eval()
    reference = (DynamicQuantLSTM if kind is nn.LSTM else DynamicQuantGRU).from_float(
        rnn, backend_quant(engine, None).dynamic, False)
    module = DynamicInt8RNN(reference, engine)
    x = torch.exp(torch.randn(batch, 9, 40) * 2)  # wide-range frames, as the speech stand-in's
    with torch.inference_mode():
        expected = module(x)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # the export form, run eagerly
        got = module(x)
    flat = [expected[0], *expected[1]] if kind is nn.LSTM else list(expected)
    got_flat = [got[0], *got[1]] if kind is nn.LSTM else list(got)
    assert all(torch.equal(a, b) for a, b in zip(got_flat, flat, strict=True))

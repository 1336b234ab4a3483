"""torch's dynamic int8 CPU kernels (fbgemm / x86 engine) written in plain aten ops, for files that cannot hold
packed weights (``torch.export`` programs, the eager side of the ONNX ops).

``dynamic_linear`` is ``quantized::linear_dynamic``: the input's per-tensor uint8 qparams from its min/max
(``choose_qparams``: ATen's ``ChooseQuantizationParams``, 7 bits with ``reduce_range``); the input rounded as
fbgemm's ``Quantize`` does, ``round(x * (1 / scale)) + zero_point`` in float32 (torch < 2.14:
``round(x * (1 / scale) + zero_point)``, which differs at ties); an exact integer GEMM
(``torch._int_mm`` on the input shifted to int8, plus the shift times each weight row's sum); then fbgemm's float
epilogue ``fma(float(acc), x_scale * w_scale, bias)``, the fused multiply-add computed in float64 and rounded to
float32 once (which equals it except where the float64 value falls on a float32 tie: not met in the tests).
``dynamic_rnn_layer`` is one layer and direction of ``torch.quantized_lstm`` / ``quantized_gru`` with
``use_dynamic``: the whole input sequence projected in one dynamic linear call, then per step the hidden state's
dynamic linear and ATen's cell arithmetic (``RNN.cpp``'s LSTMCell / GRUCell) in the same order, sigmoid and tanh
on views of the same layout (their vectorized and scalar paths round differently).
Why bit-identical on the fbgemm and x86 engines (tested against the kernels): the same integers, the same float
operations in the same order. The oneDNN and qnnpack engines agree within float rounding.
Preconditions: weights are the int8 values (``int_repr``) with float32 per-row scales (``int8_parts``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

__all__ = ["choose_qparams", "dynamic_linear", "dynamic_rnn_layer", "int8_parts"]

_SMALL_SCALE = 6.1e-5  # ATen's SMALL_SCALE_THRESHOLD: smaller scales are raised to it (range widened alike)


def int8_parts(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(int8 values, float32 scale per row, int32 zero point per row) of a quantized weight (per row or per tensor:
    a per-tensor scale repeated over the rows computes the same)."""
    rows = weight.shape[0]
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero_point = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    else:
        scale, zero_point = torch.tensor([weight.q_scale()]), torch.tensor([weight.q_zero_point()])
    return weight.int_repr(), scale.float().expand(rows).contiguous(), zero_point.int().expand(rows).contiguous()


def choose_qparams(x: Tensor, reduce_range: bool) -> tuple[Tensor, Tensor]:
    """(scale float32, zero point float64) of ``x``'s per-tensor uint8 grid, as ATen's ChooseQuantizationParams:
    the range widened to hold 0, scale in float64 rounded to float32, zero point from the end with less error."""
    qmax = 127 if reduce_range else 255
    lo, hi = x.min().clamp(max=0).double(), x.max().clamp(min=0).double()
    scale = (hi - lo) / qmax
    unusable = (scale.float() == 0) | torch.isinf(1.0 / scale.float())
    scale = torch.where(unusable, torch.full_like(scale, 0.1), scale)
    small = scale < _SMALL_SCALE  # widen the range by the factor the scale grows (or extend the open end)
    factor = (_SMALL_SCALE / scale.float()).double()
    both = small & (lo != 0) & (hi != 0)
    lo = torch.where(both, (lo * factor).float().double(), lo)
    hi = torch.where(both, (hi * factor).float().double(), hi)
    hi = torch.where(small & (lo == 0), torch.full_like(hi, _SMALL_SCALE * qmax), hi)
    lo = torch.where(small & (hi == 0), torch.full_like(lo, -_SMALL_SCALE * qmax), lo)
    scale = torch.where(small, torch.full_like(scale, _SMALL_SCALE), scale)
    from_lo, from_hi = -lo / scale, qmax - hi / scale
    zero_point = torch.where(-(lo / scale).abs() < qmax - (hi / scale).abs(), from_lo, from_hi)
    return scale.float(), torch.round(zero_point).clamp(0, qmax)


# the torch release whose fbgemm adds the zero point after rounding; before it, before rounding (measured on 2.13:
# the two differ where x / scale is a tie, e.g. on bf16-valued inputs)
_ROUNDS_BEFORE_ZERO_POINT = TorchVersion(torch.__version__) >= (2, 14)


def _quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int) -> Tensor:
    """uint8 codes (as int32) of ``x`` as the installed torch's fbgemm ``Quantize`` computes them, clamped."""
    scaled = x * (1.0 / scale)
    codes = torch.round(scaled) + zero_point.float() if _ROUNDS_BEFORE_ZERO_POINT else \
        torch.round(scaled + zero_point.float())
    return codes.clamp(0, qmax).to(torch.int32)


def _int_matmul(codes: Tensor, weight: Tensor) -> Tensor:
    """``codes @ weight.T`` exactly, in int32: uint8 codes shifted onto int8 for ``torch._int_mm``."""
    shifted = (codes - 128).to(torch.int8).reshape(-1, codes.shape[-1])
    acc = torch._int_mm(shifted, weight.t().contiguous()) if shifted.shape[0] > 0 else \
        shifted.new_zeros(0, weight.shape[0], dtype=torch.int32)
    return acc + 128 * weight.to(torch.int32).sum(1)


def dynamic_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor, bias: Tensor | None,
                   reduce_range: bool) -> Tensor:
    """``quantized::linear_dynamic`` (fbgemm) in plain ops: ``x`` float32, ``weight`` int8 (out, in) with per-row
    or 0-d ``weight_scale`` / ``weight_zero_point``, ``bias`` float32 or None."""
    scale, zero_point = choose_qparams(x, reduce_range)
    codes = _quantize(x, scale, zero_point, 127 if reduce_range else 255)
    acc = _int_matmul(codes, weight) - zero_point.to(torch.int32) * weight.to(torch.int32).sum(1)
    w_zp = weight_zero_point.to(torch.int32)
    acc = acc - w_zp * (codes.reshape(acc.shape[0], -1).sum(1, keepdim=True) - weight.shape[1] * zero_point.int())
    multiplier = (scale * weight_scale.float()).double()
    out = acc.float().double() * multiplier
    out = (out if bias is None else out + bias.double()).float()
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    i, f, g, o = gates.chunk(4, 1)  # views of one tensor, as ATen's cell applies sigmoid / tanh to (see _gru_cell)
    c = (f.sigmoid() * c) + (i.sigmoid() * g.tanh())
    return o.sigmoid() * c.tanh(), c


def _gru_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    # sigmoid and tanh round their last elements (a row's tail) otherwise than the rest: each runs on a view of
    # the same shape and strides as in ATen's cell (the gate rows of one tensor), so the same elements are tails
    size = h.shape[1]
    summed = gh[:, :2 * size] + gi[:, :2 * size]
    reset, update = summed[:, :size].sigmoid(), summed[:, size:].sigmoid()
    new = (gi[:, 2 * size:] + gh[:, 2 * size:] * reset).tanh()
    return (h - new) * update + new


def dynamic_rnn_layer(mode: str, x: Tensor, h: Tensor, c: Tensor | None, ih: tuple, hh: tuple, reduce_range: bool,
                      reverse: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction of a dynamic int8 LSTM / GRU: ``x`` (T, N, F), ``h`` / ``c`` (N, H); ``ih`` / ``hh``:
    (weight, scale, zero point, bias) of the input and hidden projections. Returns (output (T, N, H), h, c)."""
    projected = dynamic_linear(x, *ih, reduce_range)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs: list[Tensor] = [h] * x.shape[0]
    for t in steps:
        hidden = dynamic_linear(h, *hh, reduce_range)
        if mode == "LSTM":
            assert c is not None
            h, c = _lstm_cell(hidden + projected[t], c)
        else:
            h = _gru_cell(projected[t], hidden, h)
        outputs[t] = h
    return torch.stack(outputs) if outputs else x.new_zeros(0, *h.shape), h, c

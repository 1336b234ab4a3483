"""ONNX twins of the dynamic RNN modules (used by ``fxforge.serialization.onnx.export_onnx``).

``DynamicInt8RNN`` holds prepacked cells the ONNX exporter cannot record. Its twin ``OnnxDynamicLSTM`` runs the
stack layer by layer on plain tensors: an int8 layer as ``fxforge::dynamic_lstm`` (written as ONNX Runtime's
``DynamicQuantizeLSTM``: the same int8 weights, per-row scales, inputs and hidden state quantized per call), an
fp16 layer as an fp32 ``nn.LSTM`` on the fp16-rounded weights (written as ONNX ``LSTM``). ``Bf16RNN`` (a layer
quantize-dynamic put on oneDNN's bf16 RNN) becomes an fp32 ``nn.LSTM`` / ``nn.GRU`` on its bf16-rounded weights:
the file runs it in fp32, and says so (``export_note``). A dynamic GRU has no twin: ONNX Runtime has no dynamic
int8 GRU, and the export names the node.
Why the same function: the same weights and the same per-layer computation, in ONNX's layouts (gate order
i, o, f, c; weights (directions, in, 4 * hidden)); activation qparams are ONNX Runtime's, within int8 rounding
of torch's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from fxforge.errors import ExportError
from fxforge.passes.quantize_dynamic import Bf16RNN
from fxforge.quant.dynamic_kernels import int8_parts
from fxforge.serialization.onnx import register_onnx_twin
from fxforge.serialization.onnx_dynamic import ONNX_GATES, dynamic_lstm_op, reorder_gates

from .int8_rnn import DynamicInt8RNN


def _onnx_weight(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One direction's projection in ONNX's layout: (int8 (in, 4 * hidden), scales, zero points), gates reordered."""
    values, scale, zero_point = int8_parts(w)
    return (reorder_gates(values, ONNX_GATES).t().contiguous(), reorder_gates(scale, ONNX_GATES),
            reorder_gates(zero_point.to(torch.int8), ONNX_GATES))


class OnnxDynamicLSTM(nn.Module):
    """What ``DynamicInt8RNN`` (LSTM) computes, layer by layer on plain tensors (module docstring)."""

    def __init__(self, rnn: DynamicInt8RNN) -> None:
        super().__init__()
        self.hidden_size, self.num_layers, self.bidirectional = rnn.hidden_size, rnn.num_layers, rnn.bidirectional
        self.batch_first, self.directions = rnn.batch_first, 2 if rnn.bidirectional else 1
        self.schemes = tuple(rnn.layer_schemes)
        self.float_layers = nn.ModuleDict()
        for layer, scheme in enumerate(self.schemes):
            cells = rnn.cells[layer * self.directions:(layer + 1) * self.directions]
            if scheme == "int8":
                self._register_int8(layer, cells)
            else:
                self.float_layers[str(layer)] = self._float_layer(cells)

    def _register_int8(self, layer: int, cells: list[tuple]) -> None:
        ws, rs = [_onnx_weight(c[0]) for c in cells], [_onnx_weight(c[1]) for c in cells]
        tensors = {"w": [w[0] for w in ws], "w_scale": [w[1] for w in ws], "w_zero_point": [w[2] for w in ws],
                   "r": [r[0] for r in rs], "r_scale": [r[1] for r in rs], "r_zero_point": [r[2] for r in rs],
                   "b": [torch.cat([reorder_gates(c[2], ONNX_GATES), reorder_gates(c[3], ONNX_GATES)]) for c in cells]}
        for name, parts in tensors.items():
            self.register_buffer(f"l{layer}_{name}", torch.stack(parts))

    def _float_layer(self, cells: list[tuple]) -> nn.LSTM:
        """An fp32 one-layer LSTM on an fp16 layer's (rounded) weights."""
        lstm = nn.LSTM(cells[0][0].shape[1], self.hidden_size, 1, bidirectional=self.bidirectional)
        with torch.no_grad():
            for (w_ih, w_hh, b_ih, b_hh), sfx in zip(cells, ("", "_reverse"), strict=False):
                for name, value in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
                    getattr(lstm, f"{name}_l0{sfx}").copy_(value)
        return lstm.eval()

    def _layer(self, layer: int, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(output (T, N, directions * H), h, c) of one layer on time-major ``x``."""
        if self.schemes[layer] != "int8":
            out, (h, c) = self.float_layers[str(layer)](x, (h0, c0))
            return out, h, c
        args = [getattr(self, f"l{layer}_{n}") for n in ("w", "r", "b", "w_scale", "w_zero_point", "r_scale",
                                                         "r_zero_point")]
        y, h, c = dynamic_lstm_op(x, h0, c0, *args, self.hidden_size, self.bidirectional)
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1), h, c

    def forward(self, x: Tensor, hx: Any = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        batched = x.dim() == 3
        x = x if batched else x.unsqueeze(0 if self.batch_first else 1)
        x = x.transpose(0, 1) if self.batch_first else x  # time-major, as ONNX's LSTM
        zeros = x.new_zeros(self.num_layers * self.directions, x.shape[1], self.hidden_size)
        h0, c0 = (zeros, zeros) if hx is None else hx if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        hs, cs = [], []
        for layer in range(self.num_layers):
            rows = slice(layer * self.directions, (layer + 1) * self.directions)
            x, h, c = self._layer(layer, x, h0[rows], c0[rows])
            hs.append(h)
            cs.append(c)
        h, c = torch.cat(hs), torch.cat(cs)
        x = x.transpose(0, 1) if self.batch_first else x
        if not batched:
            return x.squeeze(0 if self.batch_first else 1), (h.squeeze(1), c.squeeze(1))
        return x, (h, c)


class Fp32RNN(nn.Module):
    """``Bf16RNN``'s LSTM / GRU in fp32, on its bf16-rounded weights (module docstring)."""

    def __init__(self, bf16: Bf16RNN) -> None:
        super().__init__()
        self.rnn = copy.deepcopy(bf16.rnn).float()
        self.export_note = (f"the compiled model runs this {type(self.rnn).__name__} in bf16 (oneDNN's bf16 RNN); "
                            "this file runs it in fp32, on the bf16-rounded weights")

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.rnn(x)


@register_onnx_twin
def onnx_twin(module: nn.Module) -> nn.Module | None:
    """The ONNX twin of a dynamic RNN module, else None; ExportError for an int8 GRU layer."""
    if isinstance(module, Bf16RNN):
        return Fp32RNN(module)
    if not isinstance(module, DynamicInt8RNN):
        return None
    if module.mode == "GRU":
        raise ExportError("a dynamic int8 GRU has no ONNX form (ONNX Runtime has a dynamic int8 LSTM, no GRU): skip "
                          "the GRU (skip=[...]) to keep it fp32, export it as .pt2, or fxforge.save the compiled model",
                          op="DynamicInt8RNN")
    return OnnxDynamicLSTM(module)

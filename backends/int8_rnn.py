"""Dynamic int8 LSTM/GRU on torch's kernels: the runtime module lower-<engine> puts in place of the
reference ``DynamicQuantLSTM`` / ``DynamicQuantGRU``.

Each layer and direction's weights are prepacked once (``quantized.linear_prepack`` of the int8 grid values
the reference module holds, so the weights are bit-identical) into dynamic cell parameters; ``forward`` runs
``torch.quantized_lstm`` / ``torch.quantized_gru`` with ``use_dynamic``: inputs and hidden state are
quantized per call inside the kernels, which is what the reference module's numerics follow. A layer the
reference keeps at fp16 (``layer_schemes``) gets torch's fp16 cell parameters: fp32 activations, fp16 weights.
Packed parameters are opaque and engine-specific: copies and pickles rebuild them from the int8 weights.
Export form (``torch.compiler.is_exporting()``, what a ``.pt2`` program holds): each int8 layer as plain aten ops
(``quant.dynamic_kernels.dynamic_rnn_layer``: the same int8 values and arithmetic, bit-identical on the fbgemm and
x86 engines), its time steps unrolled, so the sequence length is fixed in the program (a dynamic one is an
``ExportError``); an fp16 layer as ``torch.lstm`` / ``torch.gru`` on its fp16-rounded weights in fp32 (fbgemm's
fp16 kernels agree with it within float rounding, not bit for bit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxforge.errors import BackendUnavailableError, ExportError
from fxforge.quant.deprecation import quantized_tensors_quietly
from fxforge.quant.dynamic_kernels import dynamic_rnn_layer, int8_parts
from fxforge.quant.qspec import quantized_engine
from fxforge.quant.reference import DynamicQuantGRU, DynamicQuantLSTM
from fxforge.quant.runtime import register_runtime

_q = torch.ops.quantized


class DynamicInt8RNN(nn.Module):
    """LSTM or GRU with prepacked int8 weights, run by torch's dynamic quantized RNN kernels."""

    def __init__(self, reference: DynamicQuantLSTM | DynamicQuantGRU, engine: str) -> None:
        super().__init__()
        self.mode = "LSTM" if isinstance(reference, DynamicQuantLSTM) else "GRU"
        self.engine = engine
        for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional",
                     "dropout", "reduce_range"):
            setattr(self, attr, getattr(reference, attr))
        self.layer_schemes = reference.layer_schemes
        directions = ("", "_reverse") if self.bidirectional else ("",)
        self.cells = [(self._weight(reference, f"weight_ih_l{layer}{sfx}"),
                       self._weight(reference, f"weight_hh_l{layer}{sfx}"), *self._biases(reference, layer, sfx))
                      for layer in range(self.num_layers) for sfx in directions]
        self._pack()

    @staticmethod
    def _weight(reference: DynamicQuantLSTM | DynamicQuantGRU, name: str) -> torch.Tensor:
        """The int8 weight (a quantized tensor), or the fp32 values of an fp16 layer's weight."""
        if reference.scheme_of(name) == "fp16":
            return getattr(reference, name).clone()
        w, scale, zero_point = (getattr(reference, n) for n in (name, f"{name}_scale", f"{name}_zero_point"))
        with quantized_tensors_quietly():
            if scale.dim() == 0:
                return torch.quantize_per_tensor(w, float(scale), int(zero_point), torch.qint8)
            return torch.quantize_per_channel(w, scale, zero_point, 0, torch.qint8)

    def _biases(self, reference: nn.Module, layer: int, sfx: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.bias:  # the kernels require biases: zeros add nothing
            rows = (4 if self.mode == "LSTM" else 3) * self.hidden_size
            return torch.zeros(rows), torch.zeros(rows)
        return getattr(reference, f"bias_ih_l{layer}{sfx}"), getattr(reference, f"bias_hh_l{layer}{sfx}")

    def _pack(self) -> None:
        with quantized_engine(self.engine):
            self.packed = [self._cell_params(*cell) for cell in self.cells]
        # the export form's operands: (input, hidden) projections as (int8, scale, zero point, bias) per cell
        self.plain = [None if not w_ih.is_quantized else ((*int8_parts(w_ih), b_ih), (*int8_parts(w_hh), b_hh))
                      for w_ih, w_hh, b_ih, b_hh in self.cells]

    def _cell_params(self, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor) -> Any:
        if not w_ih.is_quantized:  # an fp16 layer: only fbgemm has fp16 kernels (they run under any engine)
            if "fbgemm" not in torch.backends.quantized.supported_engines:
                raise BackendUnavailableError(
                    f"a dynamic {self.mode} layer kept at fp16 needs fbgemm's fp16 kernels, which this torch build "
                    f"lacks (engine '{self.engine}'): skip the {self.mode} (skip=[...]) to keep it fp32")
            with quantized_engine("fbgemm"):
                return _q.make_quantized_cell_params_fp16(_q.linear_prepack_fp16(w_ih, b_ih),
                                                          _q.linear_prepack_fp16(w_hh, b_hh))
        return _q.make_quantized_cell_params_dynamic(_q.linear_prepack(w_ih, b_ih), _q.linear_prepack(w_hh, b_hh),
                                                     b_ih, b_hh, self.reduce_range)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("packed", None)
        state.pop("plain", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pack()

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        hx = self._initial_state(x, hx, batched)
        args = (self.packed, True, self.num_layers, float(self.dropout), False, self.bidirectional,
                self.batch_first)
        if torch.compiler.is_exporting():
            out, state = self._plain_stack(x, hx)
        elif self.mode == "LSTM":
            out, h, c = torch.quantized_lstm(x, hx, *args, dtype=torch.qint8, use_dynamic=True)
            state: Any = (h, c)
        else:
            out, state = torch.quantized_gru(x, hx, *args)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
        return out, state

    def _plain_stack(self, x: torch.Tensor, hx: Any) -> tuple[torch.Tensor, Any]:
        """The export form (module docstring): the stack layer by layer in plain ops, on batched ``x``."""
        x = x.transpose(0, 1) if self.batch_first else x
        if not isinstance(x.shape[0], int):
            raise ExportError(f"a dynamic int8 {self.mode} runs its time steps one by one in a .pt2 program, so the "
                              "sequence length cannot stay dynamic: export with dynamic=False, or compile with a "
                              "fixed sequence length", op="DynamicInt8RNN")
        h0, c0 = hx if self.mode == "LSTM" else (hx, None)
        directions = 2 if self.bidirectional else 1
        hs, cs = [], []
        for layer in range(self.num_layers):
            rows = slice(layer * directions, (layer + 1) * directions)
            x, h, c = self._plain_layer(layer, x, h0[rows], None if c0 is None else c0[rows])
            hs.append(h)
            cs.append(c)
        x = x.transpose(0, 1) if self.batch_first else x
        return x, ((torch.cat(hs), torch.cat(cs)) if self.mode == "LSTM" else torch.cat(hs))

    def _plain_layer(self, layer: int, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(output (T, N, directions * H), h, c) of one layer of the stack on time-major ``x``."""
        directions = 2 if self.bidirectional else 1
        cells = range(layer * directions, (layer + 1) * directions)
        if self.plain[cells[0]] is None:  # fp16 weights on fp32 activations: the float op on the rounded weights
            weights = [w for i in cells for w in self.cells[i]]
            if self.mode == "LSTM":
                out, h, c = torch.lstm(x, (h0, c0), weights, True, 1, 0.0, False, self.bidirectional, False)
                return out, h, c
            out, h = torch.gru(x, h0, weights, True, 1, 0.0, False, self.bidirectional, False)
            return out, h, None
        results = [dynamic_rnn_layer(self.mode, x, h0[d], None if c0 is None else c0[d], *self.plain[i],
                                     self.reduce_range, reverse=d == 1) for d, i in enumerate(cells)]
        out = torch.cat([r[0] for r in results], 2) if directions > 1 else results[0][0]
        c = None if c0 is None else torch.stack([r[2] for r in results])
        return out, torch.stack([r[1] for r in results]), c

    def _initial_state(self, x: torch.Tensor, hx: Any, batched: bool) -> Any:
        batch = x.size(0 if self.batch_first else 1)
        zeros = x.new_zeros(self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)
        if hx is None:
            return (zeros, zeros.clone()) if self.mode == "LSTM" else zeros
        if not batched:
            hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        return hx

    def extra_repr(self) -> str:
        return f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, engine={self.engine}"


for _reference in (DynamicQuantLSTM, DynamicQuantGRU):  # quantize-dynamic times the kernels that will run
    register_runtime(_reference, DynamicInt8RNN)

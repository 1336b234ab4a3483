"""Dynamic int8 LSTM/GRU on torch's kernels: the runtime module lower-<engine> puts in place of the
reference ``DynamicQuantLSTM`` / ``DynamicQuantGRU``.

Each layer and direction's weights are prepacked once (``quantized.linear_prepack`` of the int8 grid values
the reference module holds, so the weights are bit-identical) into dynamic cell parameters; ``forward`` runs
``torch.quantized_lstm`` / ``torch.quantized_gru`` with ``use_dynamic``: inputs and hidden state are
quantized per call inside the kernels, which is what the reference module's numerics follow. A layer the
reference keeps at fp16 (``layer_schemes``) gets torch's fp16 cell parameters: fp32 activations, fp16 weights.
Packed parameters are opaque and engine-specific: copies and pickles rebuild them from the int8 weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxforge.errors import BackendUnavailableError
from fxforge.quant.deprecation import quantized_tensors_quietly
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
        if self.mode == "LSTM":
            out, h, c = torch.quantized_lstm(x, hx, *args, dtype=torch.qint8, use_dynamic=True)
            state: Any = (h, c)
        else:
            out, state = torch.quantized_gru(x, hx, *args)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
        return out, state

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

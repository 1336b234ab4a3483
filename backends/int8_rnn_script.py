"""TorchScript twins of ``DynamicInt8RNN`` (used by ``CompiledModule.to_torchscript``).

``torch.jit.trace`` cannot record the prepacked dynamic cells, which ``DynamicInt8RNN`` keeps in a Python
list; a *scripted* module holds them as a typed attribute (``List[CellParamsBase]``) and calls the same
``torch.quantized_lstm`` / ``torch.quantized_gru`` kernels with the same arguments, so the outputs are
bit-identical (tested). The forward mirrors ``DynamicInt8RNN.forward``: batched or unbatched input, an
optional initial state.
"""

# No ``from __future__ import annotations``: TorchScript reads these annotations as objects, not text.
from typing import Optional

import torch
from torch import nn

from fxforge.serialization.torchscript import register_scripted_twin

from .int8_rnn import DynamicInt8RNN


class _ScriptableRNN(nn.Module):
    num_layers: int
    dropout: float
    bidirectional: bool
    batch_first: bool
    hidden_size: int

    def __init__(self, rnn: DynamicInt8RNN) -> None:
        super().__init__()
        self.packed = rnn.packed
        self.num_layers, self.dropout, self.hidden_size = rnn.num_layers, float(rnn.dropout), rnn.hidden_size
        self.bidirectional, self.batch_first = rnn.bidirectional, rnn.batch_first

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0) if self.batch_first else x.size(1)
        return x.new_zeros(self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 3 else x.unsqueeze(0 if self.batch_first else 1)

    def _unbatched(self, out: torch.Tensor, batched: bool) -> torch.Tensor:
        return out if batched else out.squeeze(0 if self.batch_first else 1)


class ScriptableDynamicLSTM(_ScriptableRNN):
    def forward(self, x: torch.Tensor, hx: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # noqa: UP045
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batched = x.dim() == 3
        x = self._batched(x)
        if hx is None:
            h0, c0 = self._zeros(x), self._zeros(x)
        else:
            h0, c0 = hx if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        out, h, c = torch.quantized_lstm(x, [h0, c0], self.packed, True, self.num_layers, self.dropout, False,
                                         self.bidirectional, self.batch_first, dtype=torch.qint8, use_dynamic=True)
        if not batched:
            h, c = h.squeeze(1), c.squeeze(1)
        return self._unbatched(out, batched), (h, c)


class ScriptableDynamicGRU(_ScriptableRNN):
    def forward(self, x: torch.Tensor, hx: Optional[torch.Tensor] = None  # noqa: UP045
                ) -> tuple[torch.Tensor, torch.Tensor]:
        batched = x.dim() == 3
        x = self._batched(x)
        h0 = self._zeros(x) if hx is None else (hx if batched else hx.unsqueeze(1))
        out, h = torch.quantized_gru(x, h0, self.packed, True, self.num_layers, self.dropout, False,
                                     self.bidirectional, self.batch_first)
        return self._unbatched(out, batched), (h if batched else h.squeeze(1))


@register_scripted_twin
def scripted_twin(module: nn.Module) -> torch.jit.ScriptModule | None:
    """The scripted twin of a dynamic int8 LSTM/GRU, else None."""
    if not isinstance(module, DynamicInt8RNN):
        return None
    return torch.jit.script(ScriptableDynamicLSTM(module) if module.mode == "LSTM" else ScriptableDynamicGRU(module))

"""Reference numerics of weight-only and dynamic int8 quantization (clear fp32 code, not fast kernels).

Every weight is rounded onto its int8 grid once (``quantize_weight``: per channel along ``spec.axis`` or per
tensor) and kept *dequantized*, next to ``scale`` / ``zero_point`` buffers from which lowering recovers the
int8 values exactly. In dynamic mode each activation is rounded at run time onto a quint8 grid chosen from
that tensor's own min/max (``dynamic_quantize``: ATen's ``ChooseQuantizationParams``, 7 bits with
``reduce_range``), so no calibration is needed. ``DynamicQuantLSTM`` / ``DynamicQuantGRU`` run torch's gate
equations in Python with int8 weights and fp32 biases, quantizing the layer input once per sequence and the
hidden state at every step, as ATen's CPU kernels do. A layer whose input cannot take int8 (a stack's first
layer fed wide-range features, chosen by measured sensitivity) keeps fp32 activations and fp16 weights
(``layer_schemes``), as torch's fp16 dynamic RNN cells compute it.
Why: these modules *define* what a dynamically quantized model computes. The rewrites produce them, the
report's SQNR measures them, and lowering swaps them for torch's dynamic int8 kernels
(``quantized::linear_dynamic``, ``quantized_lstm`` / ``quantized_gru``), whose numerics they follow: an int32
accumulation of (x_q - zp) * w_q scaled by ``x_scale * w_scale`` equals the fp32 product of the dequantized
values up to fp32 rounding. ``torch.ao.quantization`` (deprecated) is not used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deprecation import quantized_tensors_quietly
from .qspec import QSpec

__all__ = ["RNN_SCHEMES", "DynamicQuantGRU", "DynamicQuantLSTM", "dynamic_quantize", "quantize_weight"]

# what one layer of a dynamic RNN computes: int8 weights and per-call int8 activations, or fp16 weights on fp32
RNN_SCHEMES = ("int8", "fp16")


def quantize_weight(weight: Tensor, spec: QSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(dequantized weight on the int8 grid, scale, zero_point) of ``weight`` under ``spec``.

    Per channel along ``spec.axis`` when set (each channel's min/max over the other dims; scale float32 and
    zero_point int64 of shape ``(weight.shape[axis],)``), else per tensor (0-d scale and zero_point).
    Values are clamped to ``[quant_min, quant_max]`` on the grid, which may be narrower than the dtype's.
    """
    w = weight.detach().float()
    if spec.axis is not None:
        axis = spec.axis % w.dim()
        flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
        scale, zero_point = spec.qparams(flat.amin(1), flat.amax(1))
        shape = [1] * w.dim()
        shape[axis] = -1
        s, z = scale.view(shape), zero_point.view(shape).float()
        w = torch.minimum(torch.maximum(w, (spec.quant_min - z) * s), (spec.quant_max - z) * s)
        with quantized_tensors_quietly():
            q = torch.quantize_per_channel(w, scale, zero_point, axis, spec.dtype)
    else:
        scale, zero_point = spec.qparams(w.min(), w.max())
        s, z = float(scale), int(zero_point)
        w = w.clamp((spec.quant_min - z) * s, (spec.quant_max - z) * s)
        with quantized_tensors_quietly():
            q = torch.quantize_per_tensor(w, s, z, spec.dtype)
    return q.dequantize(), scale, zero_point


def dynamic_quantize(x: Tensor, reduce_range: bool) -> Tensor:
    """``x`` rounded onto a per-tensor quint8 grid chosen from its own min/max (7 bits with ``reduce_range``).

    ``torch.quantize_per_tensor_dynamic`` then dequantized: what dynamic int8 kernels do to each input.
    """
    if x.numel() == 0:
        return x
    with quantized_tensors_quietly():
        q = torch.quantize_per_tensor_dynamic(x.detach().float().contiguous(), torch.quint8, reduce_range)
    return q.dequantize().to(x.dtype)


class _DynamicQuantRNN(nn.Module):
    """Shared structure of the dynamic int8 LSTM / GRU: buffers, shape handling, the layer loop."""

    mode: str = ""
    gates: int = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 reduce_range: bool = True, weight_spec: QSpec | None = None,
                 layer_schemes: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.layer_schemes = tuple(layer_schemes) if layer_schemes is not None else ("int8",) * num_layers
        if len(self.layer_schemes) != num_layers or not set(self.layer_schemes) <= set(RNN_SCHEMES):
            raise ValueError(f"{type(self).__name__}: layer_schemes needs one of {RNN_SCHEMES} per layer "
                             f"({num_layers}), got {self.layer_schemes}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.reduce_range = reduce_range
        spec = weight_spec if weight_spec is not None else QSpec(torch.qint8, -128, 127, symmetric=True, axis=0)
        if spec.axis not in (None, 0, -2):
            raise ValueError(f"{type(self).__name__}: weights are quantized per output row (axis 0) or per tensor "
                             f"(axis None), got axis={spec.axis}")
        self.weight_spec = spec if spec.axis is None else spec.with_axis(0)
        rows = self.gates * hidden_size
        qshape = (rows,) if self.weight_spec.axis is not None else ()
        for name, in_features in self._weight_names():
            self.register_buffer(name, torch.zeros(rows, in_features))
            self.register_buffer(f"{name}_scale", torch.ones(qshape))
            self.register_buffer(f"{name}_zero_point", torch.zeros(qshape, dtype=torch.int64))
        if bias:
            for name in self._bias_names():
                self.register_buffer(name, torch.zeros(rows))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def _weight_names(self) -> list[tuple[str, int]]:
        names = []
        for layer in range(self.num_layers):
            in_features = self.input_size if layer == 0 else self.hidden_size * self.num_directions
            for sfx in self._suffixes():
                names += [(f"weight_ih_l{layer}{sfx}", in_features), (f"weight_hh_l{layer}{sfx}", self.hidden_size)]
        return names

    def _bias_names(self) -> list[str]:
        return [f"bias_{kind}_l{layer}{sfx}" for layer in range(self.num_layers) for sfx in self._suffixes()
                for kind in ("ih", "hh")]

    @classmethod
    def from_float(cls, rnn: nn.RNNBase, weight_spec: QSpec, reduce_range: bool,
                   layer_schemes: tuple[str, ...] | None = None) -> Any:
        """The dynamic int8 version of ``rnn``: weights rounded with ``weight_spec``, per output row (gate unit)
        when its axis is set (0), per tensor when it is None; ``reduce_range``: 7-bit activations;
        ``layer_schemes``: "int8" (default) or "fp16" per layer."""
        expected = nn.LSTM if cls.mode == "LSTM" else nn.GRU
        if not isinstance(rnn, expected):
            raise TypeError(f"{cls.__name__}.from_float expects an nn.{cls.mode}, got {type(rnn).__name__}")
        if getattr(rnn, "proj_size", 0) > 0:
            raise NotImplementedError(f"{cls.__name__}: LSTM with proj_size > 0 is not supported "
                                      f"(got proj_size={rnn.proj_size})")
        mod = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first, rnn.dropout,
                  rnn.bidirectional, reduce_range, weight_spec, layer_schemes)
        with torch.no_grad():
            for name, _ in mod._weight_names():
                if mod.scheme_of(name) == "fp16":
                    getattr(mod, name).copy_(getattr(rnn, name).detach().half().float())
                    continue
                w, scale, zero_point = quantize_weight(getattr(rnn, name), mod.weight_spec)
                getattr(mod, name).copy_(w)
                setattr(mod, f"{name}_scale", scale)
                setattr(mod, f"{name}_zero_point", zero_point)
            if rnn.bias:
                for name in mod._bias_names():
                    getattr(mod, name).copy_(getattr(rnn, name).detach().float())
        ref = next(rnn.parameters(), None)
        if ref is not None:
            mod.to(ref.device)
        return mod.train(rnn.training)

    def scheme_of(self, weight_name: str) -> str:
        """The scheme of the layer that holds ``weight_name`` (``weight_ih_l2_reverse`` -> layer 2's)."""
        return self.layer_schemes[int(weight_name.split("_l")[1].split("_")[0])]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        schemes = "" if set(self.layer_schemes) == {"int8"} else f", layer_schemes={self.layer_schemes}"
        return s + f", reduce_range={self.reduce_range}, weight={self.weight_spec.describe()}{schemes}"

    def _cell(self, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _activation_rounding(self, layer: int) -> Any:
        """Per-call int8 rounding of a layer's inputs, or none for an fp16 layer (fp32 activations)."""
        if self.layer_schemes[layer] == "fp16":
            return lambda t: t
        return lambda t: dynamic_quantize(t, self.reduce_range)

    def _run(self, input: Tensor, h0: Tensor | None, c0: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The layer loop; returns (output, h_n, c_n) in torch's layouts (c_n None for GRU)."""
        if self.training and self.dropout > 0 and self.num_layers > 1:
            raise NotImplementedError(f"{type(self).__name__}: dropout between layers in training mode is not "
                                      "supported (reference inference module); call .eval()")
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: expected 2-D (unbatched) or 3-D input, got {input.dim()}-D")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input has {input.shape[-1]} features, "
                             f"expected input_size={self.input_size}")
        unbatched = input.dim() == 2
        out_dtype = input.dtype
        x = input.float()
        x = x.unsqueeze(1) if unbatched else x.transpose(0, 1) if self.batch_first else x  # (T, N, F)
        steps, batch = x.shape[0], x.shape[1]
        layers_dirs = self.num_layers * self.num_directions
        state_shape = (layers_dirs, batch, self.hidden_size)

        def initial(state: Tensor | None, what: str) -> Tensor:
            if state is None:
                return x.new_zeros(state_shape)
            state = state.float().unsqueeze(1) if unbatched else state.float()
            if tuple(state.shape) != state_shape:
                shown = state_shape[:1] + state_shape[2:] if unbatched else state_shape
                raise ValueError(f"{type(self).__name__}: expected {what} of shape {shown}, "
                                 f"got {tuple(state.squeeze(1).shape) if unbatched else tuple(state.shape)}")
            return state

        h0 = initial(h0, "hidden state")
        c0 = initial(c0, "cell state") if self.mode == "LSTM" else None
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            # one activation scale for the whole sequence: ATen's CPU path projects it in one dynamic linear call
            quantize = self._activation_rounding(layer)
            xq = quantize(x)
            outputs = []
            for d, sfx in enumerate(self._suffixes()):
                w_ih, w_hh = getattr(self, f"weight_ih_l{layer}{sfx}"), getattr(self, f"weight_hh_l{layer}{sfx}")
                b_ih = getattr(self, f"bias_ih_l{layer}{sfx}") if self.bias else None
                b_hh = getattr(self, f"bias_hh_l{layer}{sfx}") if self.bias else None
                gi = F.linear(xq, w_ih, b_ih)  # (T, N, gates * hidden)
                idx = layer * self.num_directions + d
                h, c = h0[idx], c0[idx] if c0 is not None else None
                ys: list[Tensor] = [h] * steps
                for t in reversed(range(steps)) if d == 1 else range(steps):
                    gh = F.linear(quantize(h), w_hh, b_hh)
                    h, c = self._cell(gi[t], gh, h, c)
                    ys[t] = h
                outputs.append(torch.stack(ys) if steps else x.new_zeros(0, batch, self.hidden_size))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        hn = torch.stack(h_n)
        cn = torch.stack(c_n) if c_n else None
        if unbatched:
            x, hn, cn = x.squeeze(1), hn.squeeze(1), cn.squeeze(1) if cn is not None else None
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x.to(out_dtype), hn.to(out_dtype), cn.to(out_dtype) if cn is not None else None


class DynamicQuantLSTM(_DynamicQuantRNN):
    """``nn.LSTM`` with int8 weights (per gate row) and inputs / hidden state quantized per call (reference)."""

    mode = "LSTM"
    gates = 4

    def _cell(self, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert c is not None
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h0, c0 = hx if hx is not None else (None, None)
        output, h_n, c_n = self._run(input, h0, c0)
        assert c_n is not None
        return output, (h_n, c_n)


class DynamicQuantGRU(_DynamicQuantRNN):
    """``nn.GRU`` with int8 weights (per gate row) and inputs / hidden state quantized per call (reference)."""

    mode = "GRU"
    gates = 3

    def _cell(self, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None  # = (1 - z) * n + z * h, in torch's order

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        output, h_n, _ = self._run(input, hx, None)
        return output, h_n

"""The ONNX ops of a dynamic int8 model: ``fxforge::dynamic_linear`` and ``fxforge::dynamic_lstm``, and how
``onnx.py`` writes them (``translations``).

- ``dynamic_linear(x, weight, scale, zero_point, bias, reduce_range)`` (int8 weight (out, in), per-row scales)
  -> standard ONNX: ``DynamicQuantizeLinear(x)`` -> ``MatMulInteger`` with the int8 weight -> ``Cast`` ->
  ``Mul(x_scale * w_scale)`` -> ``Add(bias)``. ONNX Runtime fuses the chain into its DynamicQuantizeMatMul kernel;
  OpenVINO reads the standard ops. ONNX quantizes activations to 8 bits: a compile with 7-bit activations
  (``reduce_range``) runs them at 8 bits in the file.
- ``dynamic_lstm(x, h0, c0, w, r, b, w_scale, w_zero_point, r_scale, r_zero_point, hidden_size, bidirectional)``
  in ONNX's layouts (weights (directions, in, 4 * hidden) int8 in ONNX's gate order i, o, f, c; biases
  (directions, 8 * hidden); per-row scales (directions, 4 * hidden)) -> ONNX Runtime's ``com.microsoft``
  ``DynamicQuantizeLSTM`` (per-channel weight scales), outputs (Y (T, directions, N, H), Y_h, Y_c). Only ONNX
  Runtime has that op.
Both ops also run eagerly (``quant.dynamic_kernels``: torch's kernels in plain ops), so a graph holding them is
an ordinary torch program; ONNX's own activation qparams (``DynamicQuantizeLinear``: scale (max - min) / 255,
zero point rounded from the minimum) can differ from torch's by a rounding, so a file agrees with the compiled
model within int8 rounding, not bit for bit (the tests measure it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fxforge.quant.dynamic_kernels import dynamic_linear, dynamic_rnn_layer

__all__ = ["DYNAMIC_LINEAR", "DYNAMIC_LSTM", "dynamic_linear_op", "dynamic_lstm_op", "translations"]

ONNX_GATES = (0, 3, 1, 2)  # torch's LSTM gate blocks (i, f, g, o) in ONNX's order (i, o, f, c)
TORCH_GATES = (0, 2, 3, 1)  # the inverse: ONNX's blocks in torch's order


def reorder_gates(rows: Tensor, order: tuple[int, ...], dim: int = 0) -> Tensor:
    """The four gate blocks of ``rows`` along ``dim`` in ``order``."""
    blocks = rows.chunk(4, dim)
    return torch.cat([blocks[i] for i in order], dim)


@torch.library.custom_op("fxforge::dynamic_linear", mutates_args=())
def dynamic_linear_op(x: Tensor, weight: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor,
                      reduce_range: bool) -> Tensor:
    """A dynamic int8 linear on plain tensors (see the module docstring)."""
    return dynamic_linear(x, weight, scale, zero_point, bias, reduce_range)


@dynamic_linear_op.register_fake
def _dynamic_linear_meta(x: Tensor, weight: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor,
                         reduce_range: bool) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _direction(w: Tensor, b: Tensor, scale: Tensor, zero_point: Tensor, half: int) -> tuple:
    """(weight, scale, zero point, bias) of one projection in torch's layout from ONNX's (one direction)."""
    bias = b.chunk(2)[half]
    return (reorder_gates(w.t(), TORCH_GATES), reorder_gates(scale, TORCH_GATES),
            reorder_gates(zero_point.int(), TORCH_GATES), reorder_gates(bias, TORCH_GATES))


@torch.library.custom_op("fxforge::dynamic_lstm", mutates_args=())
def dynamic_lstm_op(x: Tensor, h0: Tensor, c0: Tensor, w: Tensor, r: Tensor, b: Tensor, w_scale: Tensor,
                    w_zero_point: Tensor, r_scale: Tensor, r_zero_point: Tensor, hidden_size: int,
                    bidirectional: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One dynamic int8 LSTM layer in ONNX's layouts (see the module docstring)."""
    ys, hs, cs = [], [], []
    for d in range(2 if bidirectional else 1):
        ih = _direction(w[d], b[d], w_scale[d], w_zero_point[d], 0)
        hh = _direction(r[d], b[d], r_scale[d], r_zero_point[d], 1)
        y, h, c = dynamic_rnn_layer("LSTM", x, h0[d], c0[d], ih, hh, False, reverse=d == 1)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)


@dynamic_lstm_op.register_fake
def _dynamic_lstm_meta(x: Tensor, h0: Tensor, c0: Tensor, w: Tensor, r: Tensor, b: Tensor, w_scale: Tensor,
                       w_zero_point: Tensor, r_scale: Tensor, r_zero_point: Tensor, hidden_size: int,
                       bidirectional: bool) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape[0], h0.shape[0], x.shape[1], hidden_size), torch.empty_like(h0), torch.empty_like(c0)


DYNAMIC_LINEAR = torch.ops.fxforge.dynamic_linear.default
DYNAMIC_LSTM = torch.ops.fxforge.dynamic_lstm.default


def _lstm_schema() -> Any:
    """ONNX Runtime's com.microsoft DynamicQuantizeLSTM (the onnx package does not know contrib ops)."""
    from onnx.defs import OpSchema  # optional dependency: onnx.py imports this module's users only to export

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [("X", "T"), ("W", "T2"), ("R", "T2"), ("B", "T"), ("sequence_lens", "T1"), ("initial_h", "T"),
              ("initial_c", "T"), ("P", "T"), ("W_scale", "T"), ("W_zero_point", "T2"), ("R_scale", "T"),
              ("R_zero_point", "T2")]
    optional_inputs = {"B", "sequence_lens", "initial_h", "initial_c", "P"}
    return OpSchema(
        "DynamicQuantizeLSTM", "com.microsoft", 1,
        inputs=[param(n, t, "", param_option=optional if n in optional_inputs else
                      OpSchema.FormalParameterOption.Single) for n, t in inputs],
        outputs=[param(n, "T", "", param_option=optional) for n in ("Y", "Y_h", "Y_c")],
        type_constraints=[("T", ["tensor(float)"], ""), ("T1", ["tensor(int32)"], ""),
                          ("T2", ["tensor(int8)", "tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute("hidden_size", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("direction", OpSchema.AttrType.STRING, "")])


def translations(op: Any) -> dict[Any, Callable[..., Any]]:
    """The ONNX translations of this module's ops, for ``torch.onnx.export``'s custom_translation_table (``op``:
    onnxscript's default opset)."""
    import onnxscript  # optional dependency ([export] extra), needed only to export

    msft_lstm = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "DynamicQuantizeLSTM",
                                     _lstm_schema())
    float32, int8 = 1, 3  # onnx.TensorProto.FLOAT / INT8

    def onnx_dynamic_linear(x: Any, weight: Any, scale: Any, zero_point: Any, bias: Any, reduce_range: bool) -> Any:
        q, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(q, op.Transpose(weight, perm=[1, 0]), x_zero_point, op.Cast(zero_point, to=int8))
        return op.Add(op.Mul(op.Cast(acc, to=float32), op.Mul(x_scale, scale)), bias)

    def onnx_dynamic_lstm(x: Any, h0: Any, c0: Any, w: Any, r: Any, b: Any, w_scale: Any, w_zero_point: Any,
                          r_scale: Any, r_zero_point: Any, hidden_size: int, bidirectional: bool) -> Any:
        return msft_lstm(x, w, r, b, None, h0, c0, None, w_scale, w_zero_point, r_scale, r_zero_point,
                         hidden_size=hidden_size, direction="bidirectional" if bidirectional else "forward")

    return {DYNAMIC_LINEAR: onnx_dynamic_linear, DYNAMIC_LSTM: onnx_dynamic_lstm}

"""A prepacked int8 weight that remembers which engine packed it, through deepcopy and save/load.

torch's packed conv/linear params pickle as their int8 weight and bias and are re-packed on load under
whatever ``torch.backends.quantized.engine`` is selected then. lower-x86 packs each layer for the engine whose
kernel measured fastest, and conv2d_add needs oneDNN's packing (given fbgemm's, torch 2.14 crashed), so a
weight must come back packed by the same engine. ``PackedWeight`` holds the packed object and its recipe
(kind, engine, conv geometry); pickling unpacks the weight and unpickling packs it again under its engine.
Its pickled state is tensors and plain data only, which is what ``fxforge.load`` accepts (docs/saving.md); the
lowered graph reads ``_packed_N.packed``, and ``fxforge.save`` stores the owner ``PackedWeight`` for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxforge.quant.qspec import quantized_engine

_q = torch.ops.quantized
KINDS = ("conv1d", "conv2d", "conv3d", "linear")


class PackedWeight(nn.Module):
    """``.packed`` is the engine's packed weight that the int8 kernel call reads (a graph ``get_attr``)."""

    def __init__(self, kind: str, engine: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 geometry: dict[str, Any] | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown packed weight kind {kind!r}: one of {', '.join(KINDS)}")
        self.kind, self.engine, self.geometry = kind, engine, dict(geometry or {})
        self._pack(weight, bias)
        self.eval()  # part of an inference graph

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with quantized_engine(self.engine):
            if self.kind == "linear":
                self.packed = _q.linear_prepack(weight, bias)
            else:
                g = self.geometry
                prepack = getattr(_q, f"{self.kind}_prepack")
                self.packed = prepack(weight, bias, g["stride"], g["padding"], g["dilation"], g["groups"])

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(int8 weight, fp32 bias) as packed."""
        weight, bias = getattr(_q, f"{self.kind}_unpack")(self.packed)
        return weight, bias

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["packed"] = self.unpacked()
        return state

    def __setstate__(self, state: dict) -> None:
        if state.get("kind") not in KINDS:
            raise ValueError(f"unknown packed weight kind {state.get('kind')!r}: one of {', '.join(KINDS)}")
        weight, bias = state.pop("packed")
        self.__dict__.update(state)
        self._pack(weight, bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, engine={self.engine}"

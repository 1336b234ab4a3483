"""lower-weight-only: the reference ``WeightOnlyLinear`` onto torch's weight-only CPU kernels, packed once.

    WeightOnlyLinear (int8 rows)   -> Int8WeightLinear: ``aten._weight_int8pack_mm(x, w_int8, scales)``
    WeightOnlyLinear (int4 groups) -> Int4WeightLinear: ``aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)``,
                                      the weight packed by ``aten._convert_weight_to_int4pack_for_cpu``
Why correct: both kernels compute x @ dequantize(W).T from the same integer values, scales and zero points
the reference holds (int4: ``(q - 8) * scale + zero``), up to fp32 rounding. Only the packed weights stay:
the lowered modules hold a quarter (int8) or an eighth (int4) of the fp32 weight memory, plus scales.
Preconditions: ``quantize-weight-only`` ran; the kernels are ATen CPU ops, whatever the quantized engine.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, fx, nn

from fxforge.errors import BackendUnavailableError
from fxforge.graph.matching import replace_submodule
from fxforge.passes.insert_observers import quant_options
from fxforge.passes.weight_only import WeightOnlyLinear
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass

log = logging.getLogger(__name__)

_aten = torch.ops.aten
_KERNELS = {8: "_weight_int8pack_mm", 4: "_weight_int4pack_mm_for_cpu"}


class _PackedLinear(nn.Module):
    """Flattens leading dims for a 2-D kernel and adds the bias after it."""

    def __init__(self, reference: WeightOnlyLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = reference.in_features, reference.out_features
        self.register_buffer("bias", reference.bias)

    def kernel(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.kernel(x.reshape(-1, self.in_features).float().contiguous()).to(x.dtype)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8WeightLinear(_PackedLinear):
    """y = x @ (w_int8 * scale).T + b on ``aten._weight_int8pack_mm``."""

    def __init__(self, reference: WeightOnlyLinear) -> None:
        super().__init__(reference)
        self.register_buffer("qweight", reference.qweight.clone())
        self.register_buffer("scales", reference.scales.clone())

    def kernel(self, x: Tensor) -> Tensor:
        return _aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int8 weights"


class Int4WeightLinear(_PackedLinear):
    """y = x @ ((q - 8) * scale + zero).T + b on ``aten._weight_int4pack_mm_for_cpu`` (weights packed once)."""

    def __init__(self, reference: WeightOnlyLinear) -> None:
        super().__init__(reference)
        self.group_size = reference.group_size
        self.register_buffer("packed", _aten._convert_weight_to_int4pack_for_cpu(reference.qweight.contiguous(), 1))
        # [in / group, out, (scale, zero)]: the kernel's layout
        self.register_buffer("scales_and_zeros", torch.stack([reference.scales, reference.zeros], -1)
                             .transpose(0, 1).contiguous())

    def kernel(self, x: Tensor) -> Tensor:
        return _aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int4 weights in groups of {self.group_size}"


def _bytes(module: nn.Module, names: tuple[str, ...]) -> int:
    return sum(t.numel() * t.element_size() for n in names if (t := getattr(module, n, None)) is not None)


def _check_kernel(bits: int, engine: str) -> None:
    if not hasattr(_aten, _KERNELS[bits]):
        raise BackendUnavailableError(
            f"weight-only int{bits} needs aten.{_KERNELS[bits]}, which this torch build lacks (target engine "
            f"'{engine}'): use quant_config={{'weight_bits': {12 - bits}}} or quantization='dynamic'")


def _lower(reference: WeightOnlyLinear, engine: str) -> _PackedLinear:
    _check_kernel(reference.bits, engine)
    return Int8WeightLinear(reference) if reference.bits == 8 else Int4WeightLinear(reference)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@graph_pass("lower-weight-only", requires=("quantized",), provides=("lowered",))
def lower_weight_only(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """WeightOnlyLinear -> int8 / int4 weight-only CPU kernels; reports the weight memory before and after."""
    engine = quant_options(ctx, "lower-weight-only").runtime_engine
    before = after = count = 0
    references = [(path, m) for path, m in gm.named_modules() if isinstance(m, WeightOnlyLinear)]
    for path, reference in references:  # top level, or inside a FusedLinear
        packed = _lower(reference, engine)
        before += reference.in_features * reference.out_features * 4
        after += _bytes(packed, ("qweight", "scales", "packed", "scales_and_zeros"))
        replace_submodule(gm, path, packed)
        count += 1
    notes = [f"{count} weight-only linears; weight memory {_size(before)} -> {_size(after)}"]
    log.info("lower-weight-only: %s", notes[0])
    return PassResult(gm, bool(count), notes)

"""lower-weight-only: the reference ``WeightOnlyLinear`` onto packed int8 / int4 weights, the kernel per layer
chosen by timing.

    WeightOnlyLinear (int8 rows)   -> Int8WeightLinear, kernel "int8pack": ``aten._weight_int8pack_mm``,
                                      "int8pack-bf16": the same on bf16 activations and scales, or
                                      "dequant": w = q * scale, then fp32 GEMM
    WeightOnlyLinear (int4 groups) -> Int4WeightLinear, kernel "int4pack": ``aten._weight_int4pack_mm_for_cpu``
                                      on the weight packed by ``aten._convert_weight_to_int4pack_for_cpu``,
                                      "int4pack-bf16": the same on bf16 activations, scales and zeros, or
                                      "dequant": two nibbles per byte unpacked, (q - 8) * scale + zero, GEMM
Each layer's candidates are timed on its input shape (``fxforge.numerics.timing``; layers of one shape share
the measurement) and the fastest is kept (``autotune=false``: the aten kernels on fp32 activations).
Why correct: every kernel computes x @ dequantize(W).T from the integer values, scales and zero points the
reference holds, up to fp32 rounding; the "-bf16" kernels round the activations to bf16 on the way in (8
significant bits, about 50 dB: torch's CPU kernels have their fast paths there, measured several times faster
than on fp32 inputs); the model output SQNR in the report is measured after lowering and includes it. Only
packed weights stay: a quarter (int8) or an eighth (int4) of the fp32 weight memory, plus scales. int4 packing
needs a multiple of 16 output rows: the rows are padded and the output sliced. The bf16 variants are offered
only for input widths that are multiples of 64 (torch's bf16 int8 kernel returned inf for 8 inputs and crashed
on such layers).
Preconditions: ``quantize-weight-only`` ran; the kernels are ATen CPU ops, whatever the quantized engine.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxforge.errors import BackendUnavailableError
from fxforge.graph.matching import replace_submodule
from fxforge.graph.meta import tensor_shape
from fxforge.numerics import timing
from fxforge.passes.insert_observers import quant_options
from fxforge.passes.weight_only import WeightOnlyLinear
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass

log = logging.getLogger(__name__)

_aten = torch.ops.aten
_KERNELS = {8: "_weight_int8pack_mm", 4: "_weight_int4pack_mm_for_cpu"}
_INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in blocks of 16
_BF16_BLOCK = 64  # input widths the bf16 kernel variants are offered for
SCHEDULE = timing.Schedule(warmup=2, rounds=3)


def _dtype(kernel: str) -> torch.dtype:
    """The activation / scale dtype a kernel variant runs on."""
    return torch.bfloat16 if kernel.endswith("-bf16") else torch.float32


class _PackedLinear(nn.Module):
    """Flattens leading dims for a 2-D kernel and adds the bias after it; ``kernel`` names the GEMM used."""

    def __init__(self, reference: WeightOnlyLinear, kernel: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kernel = reference.in_features, reference.out_features, kernel
        self.register_buffer("bias", reference.bias)

    def matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).float().contiguous()).to(x.dtype)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kernel={self.kernel}"


class Int8WeightLinear(_PackedLinear):
    """y = x @ (w_int8 * scale).T + b: ``aten._weight_int8pack_mm`` ("int8pack") or dequantize + GEMM."""

    KERNELS = ("int8pack", "int8pack-bf16", "dequant")

    def __init__(self, reference: WeightOnlyLinear, kernel: str = "int8pack") -> None:
        super().__init__(reference, kernel)
        self.register_buffer("qweight", reference.qweight.clone())
        self.register_buffer("scales", reference.scales.to(_dtype(kernel)))

    def matmul(self, x: Tensor) -> Tensor:
        if self.kernel.startswith("int8pack"):
            return _aten._weight_int8pack_mm(x.to(self.scales.dtype), self.qweight, self.scales).float()
        return F.linear(x, self.qweight.float() * self.scales[:, None])


class Int4WeightLinear(_PackedLinear):
    """y = x @ ((q - 8) * scale + zero).T + b per group: ``aten._weight_int4pack_mm_for_cpu`` ("int4pack") on
    the weight packed once, or ("dequant") nibbles unpacked and dequantized, then GEMM."""

    KERNELS = ("int4pack", "int4pack-bf16", "dequant")

    def __init__(self, reference: WeightOnlyLinear, kernel: str = "int4pack") -> None:
        super().__init__(reference, kernel)
        self.group_size = reference.group_size
        q, scales, zeros = reference.qweight, reference.scales, reference.zeros
        if kernel.startswith("int4pack"):
            pad = -self.out_features % _INT4_ROWS
            q, scales, zeros = F.pad(q, (0, 0, 0, pad)), F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
            self.register_buffer("packed", _aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
            # [in / group, padded out, (scale, zero)]: the kernel's layout
            self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
                                 .to(_dtype(kernel)))
        else:
            self.register_buffer("packed", (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8))
            self.register_buffer("scales_and_zeros", torch.stack([scales, zeros]))  # [2, out, in / group]

    def matmul(self, x: Tensor) -> Tensor:
        if self.kernel.startswith("int4pack"):
            sz = self.scales_and_zeros
            y = _aten._weight_int4pack_mm_for_cpu(x.to(sz.dtype), self.packed, self.group_size, sz).float()
            return y[:, :self.out_features] if y.shape[1] != self.out_features else y
        q = torch.stack([self.packed >> 4, self.packed & 15], -1).reshape(self.out_features, -1, self.group_size)
        scales, zeros = self.scales_and_zeros
        w = (q.float() - 8) * scales[..., None] + zeros[..., None]
        return F.linear(x, w.reshape(self.out_features, self.in_features))


def _bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers() if name != "bias")


def _check_kernel(bits: int, engine: str) -> None:
    if not hasattr(_aten, _KERNELS[bits]):
        raise BackendUnavailableError(
            f"weight-only int{bits} needs aten.{_KERNELS[bits]}, which this torch build lacks (target engine "
            f"'{engine}'): use quant_config={{'weight_bits': {12 - bits}}} or quantization='dynamic'")


def _candidates(reference: WeightOnlyLinear, autotune: bool) -> dict[str, _PackedLinear]:
    kind = Int8WeightLinear if reference.bits == 8 else Int4WeightLinear
    kernels = kind.KERNELS if autotune else kind.KERNELS[:1]
    if reference.in_features % _BF16_BLOCK:  # torch's bf16 paths return inf / crash on narrow inputs (measured)
        kernels = tuple(k for k in kernels if not k.endswith("-bf16"))
    return {kernel: kind(reference, kernel) for kernel in kernels}


def _fastest(candidates: dict[str, _PackedLinear], shape: tuple[int, ...], chosen: dict[tuple, str]) -> str:
    """The candidate kernel measured fastest on a random input of ``shape`` (one measurement per layer shape)."""
    first = next(iter(candidates.values()))
    key = (type(first).__name__, first.in_features, first.out_features, shape)
    if len(candidates) > 1 and key not in chosen:
        x = torch.randn(shape)
        with torch.inference_mode():
            chosen[key] = timing.fastest({k: (lambda m=m: m(x)) for k, m in candidates.items()}, SCHEDULE)[0]
    return chosen.get(key, next(iter(candidates)))


def _input_shape(gm: fx.GraphModule, path: str, in_features: int) -> tuple[int, ...]:
    """The layer's input shape from shape propagation (a call of the module), else one row."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == path and node.args and isinstance(node.args[0], fx.Node):
            shape = tensor_shape(node.args[0])
            if shape is not None:
                return tuple(shape)
    return (1, in_features)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@graph_pass("lower-weight-only", requires=("quantized",), provides=("lowered",))
def lower_weight_only(gm: fx.GraphModule, ctx: PassContext, autotune: bool = True) -> PassResult:
    """WeightOnlyLinear -> packed int8 / int4 weights on the kernel timed fastest per layer shape (``autotune``;
    off: the aten weight-only kernels); reports the weight memory before and after."""
    engine = quant_options(ctx, "lower-weight-only").runtime_engine
    ctx.shapes(gm)
    before = after = 0
    chosen: dict[tuple, str] = {}
    kernels: dict[str, int] = {}
    references = [(path, m) for path, m in gm.named_modules() if isinstance(m, WeightOnlyLinear)]
    for path, reference in references:  # top level, or inside a FusedLinear
        _check_kernel(reference.bits, engine)
        candidates = _candidates(reference, autotune)
        packed = candidates[_fastest(candidates, _input_shape(gm, path, reference.in_features), chosen)]
        before += reference.in_features * reference.out_features * 4
        after += _bytes(packed)
        replace_submodule(gm, path, packed)
        kernels[f"int{reference.bits} {packed.kernel}"] = kernels.get(f"int{reference.bits} {packed.kernel}", 0) + 1
    notes = [f"{len(references)} weight-only linears; weight memory {_size(before)} -> {_size(after)}"]
    if kernels:
        notes.append("kernels: " + ", ".join(f"{n} {k}" for k, n in sorted(kernels.items())))
    log.info("lower-weight-only: %s", "; ".join(notes))
    return PassResult(gm, bool(references), notes)


"""The "cpu-bf16" target: bf16 weights and activations on oneDNN, for CPUs with AMX or AVX512-BF16.

lower-cpu-bf16 rewrites (in place of lower-cpu at the end of the "cpu" target's pipeline):
    every floating parameter and buffer  =>  bfloat16
    FusedConv[Conv2d, add? act?] / Conv2d =>  OneDnnConv2dBf16  (cpu.OneDnnConv2d on a bf16 weight)
    FusedLinear[act] / Linear            =>  OneDnnLinearBf16  (cpu.OneDnnLinear on a bf16 weight)
    Conv1D; Linear + GELU / residual add =>  Linear; OneDnnLinearBf16 with the post-op (transformer_lowering.py)
    SdpaSelfAttention's out_proj         =>  OneDnnLinearBf16
    floating graph inputs / outputs      =>  cast to bf16 / back to eager's dtype and layout (backends/edges.py)
Users pass fp32 and get fp32 back; inside, every value is bf16. Plain Linear is lowered too: eager bf16
matmuls would reorder the weight on every call.
Why correct: the same oneDNN ops as lower-cpu on bf16 operands, accumulating in fp32 and rounding each output
to bf16; results differ from fp32 by that rounding, so the pass provides "reduced-precision" and compile
reports the output SQNR (verify="numeric" checks SQNR, not a tolerance).
Hardware (``bf16_unavailable_reason``): AMX or AVX512-BF16 (torch's CPUID helpers) and oneDNN bf16 support;
oneDNN's check alone is also true on plain AVX512, where it emulates bf16 slower than fp32.
FXFORGE_CPU_BF16_EMULATE=1 (for tests) makes the target usable anywhere: where oneDNN refuses bf16 the
modules run eager bf16 ops on the same weights, slowly. Preconditions: to-nhwc ran; shapes propagated; an fp32 model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.fused import FusedLinear
from fxforge.graph.matching import ACTIVATIONS, module_of
from fxforge.graph.meta import tensor_shape
from fxforge.passes.attention import SdpaSelfAttention
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.fragments import compose
from fxforge.pipeline.pass_api import graph_pass
from fxforge.pipeline.targets import Target, register_target

from .cpu import OneDnnConv2d, OneDnnLinear, conv_lowering, linear_activation, lower_modules
from .edges import cast_inputs, restore_outputs
from .transformer_lowering import conv1d_to_linear, fuse_linear_epilogues

BF16 = torch.bfloat16
EMULATE_ENV = "FXFORGE_CPU_BF16_EMULATE"
PASS_NAME = "lower-cpu-bf16"


# ---------------------------------------------------------------------------------------------- hardware
def _proc_cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cpu_has(torch_check: str, flag: str) -> bool:
    """torch's own CPUID check (torch.cpu._is_*, private: may be missing), else the Linux flag."""
    check = getattr(torch.cpu, torch_check, None)
    return bool(check()) if check is not None else flag in _proc_cpuinfo_flags()


def native_bf16_kernels() -> bool:
    """oneDNN runs bf16 convolutions and matmuls on this CPU (natively or, on plain AVX512, emulated by oneDNN)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulation_allowed() -> bool:
    return os.environ.get(EMULATE_ENV, "") == "1"


def bf16_unavailable_reason() -> str | None:
    """None when "cpu-bf16" can run here (or the testing override is set), else what the machine lacks and what
    to use instead."""
    return None if emulation_allowed() else hardware_unavailable_reason()


def hardware_unavailable_reason() -> str | None:
    """Like ``bf16_unavailable_reason``, ignoring the testing override (benchmarks: no emulated timings)."""
    instead = "use 'cpu' (fp32) or 'x86' (int8) instead"
    if not torch.backends.mkldnn.is_available():
        return f"this torch build has no oneDNN (mkldnn): {instead}"
    if not (_cpu_has("_is_amx_tile_supported", "amx_bf16") or _cpu_has("_is_avx512_bf16_supported", "avx512_bf16")):
        return (f"this CPU has neither AMX nor AVX512-BF16 (torch CPU capability: "
                f"{torch.backends.cpu.get_cpu_capability()}), so bf16 would run emulated and slower than fp32: "
                f"{instead} ({EMULATE_ENV}=1 forces the emulated path, for tests)")
    if not native_bf16_kernels():
        return f"oneDNN in this torch build does not run bf16 on this CPU: {instead}"
    return None


# ---------------------------------------------------------------------------------------------- modules
def _as_bf16(x: torch.Tensor | None) -> torch.Tensor | None:
    # a value computed in fp32 upstream (e.g. a constant); a no-op on bf16 tensors
    return x if x is None or x.dtype == BF16 else x.to(BF16)


class OneDnnConv2dBf16(OneDnnConv2d):
    """OneDnnConv2d on a bf16 weight; where oneDNN has no bf16 path (emulation), eager bf16 ops instead."""

    def _pack(self) -> None:
        self.native = native_bf16_kernels()
        super()._pack()

    def _pack_for(self, input_size: list[int] | None) -> torch.Tensor:
        return super()._pack_for(input_size) if self.native else self.weight

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        x, other = _as_bf16(x), _as_bf16(other)
        if self.native:
            return super().forward(x, other)
        x = x.contiguous(memory_format=torch.channels_last)  # the layout the oneDNN path produces
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        y = y + other if self.binary else y
        return ACTIVATIONS[self.activation](y) if self.activation else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bf16{'' if self.native else ' (emulated)'}"


class OneDnnLinearBf16(OneDnnLinear):
    """OneDnnLinear on a bf16 weight; where oneDNN has no bf16 path (emulation), eager bf16 ops instead."""

    def _pack(self) -> None:
        self.native = native_bf16_kernels()
        if self.native:
            super()._pack()
        else:
            self.packed_weight = self.weight

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        x, other = _as_bf16(x), _as_bf16(other)
        if self.native:
            return super().forward(x, other)
        y = F.linear(x, self.weight, self.bias)
        if self.binary:
            return y + other
        return linear_activation(self.activation)(y) if self.activation else y

    def extra_repr(self) -> str:
        post = ("add" if self.binary else self.activation) or "none"
        return f"{list(self.weight.shape)}, post_ops={post!r}, bf16{'' if self.native else ' (emulated)'}"


# ---------------------------------------------------------------------------------------------- lowering
def _conv_lowering(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The bf16 oneDNN module replacing ``node``, or None when it is not a lowerable Conv2d."""
    return conv_lowering(gm, node, BF16, OneDnnConv2dBf16)


def _linear_lowering(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    mod = module_of(gm, node)
    linear, activation = (mod.linear, mod.activation) if isinstance(mod, FusedLinear) else (mod, "")
    if type(linear) is not nn.Linear or linear.weight.dtype != BF16:
        return None
    shape = tensor_shape(node.args[0])
    return OneDnnLinearBf16(linear, activation, shape[0] if shape is not None and len(shape) == 2 else None)


def _lower_attention_projections(gm: fx.GraphModule) -> int:
    """attention-to-sdpa's modules call their out-projection inside forward, out of the graph's sight."""
    attention = [m for m in gm.modules() if isinstance(m, SdpaSelfAttention) and type(m.out_proj) is nn.Linear]
    for module in attention:
        module.out_proj = OneDnnLinearBf16(module.out_proj, "", None).train(module.training)
    return len(attention)


@graph_pass(name=PASS_NAME, requires=("nhwc",), provides=("lowered", "reduced-precision"))
def lower_cpu_bf16(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Everything to bf16; conv/linear onto oneDNN bf16 kernels with prepacked weights; casts at the edges."""
    ctx.shapes(gm)
    conv1d = conv1d_to_linear(gm)
    gm.to(BF16)  # every floating parameter and buffer, before lowering: the new modules take bf16 weights
    epilogues = fuse_linear_epilogues(gm, PASS_NAME, OneDnnLinearBf16, BF16)  # as lower-cpu
    counts = lower_modules(gm, PASS_NAME, _conv_lowering, _linear_lowering)
    counts["linear"] += sum(epilogues.values())
    counts["linear"] += _lower_attention_projections(gm)
    inputs = cast_inputs(gm, BF16, PASS_NAME)
    restore_outputs(gm, PASS_NAME)
    kernels = "oneDNN bf16" if native_bf16_kernels() else \
        f"eager bf16 ops (emulated: oneDNN has no bf16 path on this CPU; {EMULATE_ENV}=1)"
    ctx.note(f"weights and activations in bf16, {inputs} input(s) cast to bf16; lowered {counts['conv']} "
             f"conv(s) and {counts['linear']} linear(s) to {kernels}"
             + "".join(f", {n} with {op} fused" for op, n in sorted(epilogues.items()))
             + (f"; {conv1d} Conv1D(s) as Linear" if conv1d else ""))
    return True


register_target(Target(
    name="cpu-bf16",
    description="bf16 on CPUs with AMX / AVX512-BF16: the cpu pipeline with bf16 weights and activations on "
                "oneDNN; fp32 in and out, output SQNR vs fp32 in the report",
    pipeline=compose("cpu-graph", PASS_NAME),  # the "cpu" target's graph passes, then the bf16 lowering
    availability=bf16_unavailable_reason,
))

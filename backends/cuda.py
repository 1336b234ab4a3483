"""The CUDA backend: targets "cuda" (fp16), "cuda-bf16" and "cuda-fp32"; the lower-cuda pass and its conv module.

lower-cuda{dtype=float16,fused=true,autotune=true} rewrites:
    FusedConv[Conv2d, relu]        =>  CudaConv2d "cudnn_relu"      (torch.cudnn_convolution_relu)
    FusedConv[Conv2d, add+relu]    =>  CudaConv2d "cudnn_add_relu"  (torch.cudnn_convolution_add_relu)
    other FusedConv / Conv2d       =>  CudaConv2d "conv2d"          (F.conv2d, then the add and activation)
    floating parameters, buffers   =>  ``dtype``, once (conv weights channels-last)
    floating inputs / outputs      =>  cast to ``dtype`` channels-last / back to eager's dtype and layout
                                       (backends/edges.py)
The fused kernels serve ungrouped, undilated convs with channel counts that are multiples of 8 (tensor-core
alignment; docs/targets.md says why); with ``autotune`` and a GPU each such layer is timed with both kernels
(``fxforge.numerics.timing``), each replayed from a CUDA graph under the TF32 policy the model will run with
(cuda-runtime's ``tf32``), as the compiled model runs them, and keeps the faster; without ``autotune`` each fused
kernel is still run once, and one that fails (no cuDNN engine) is replaced by "conv2d". On the CPU nothing is
timed and a CudaConv2d computes its "conv2d" composition.
Why correct: every kernel computes conv + bias, then the add, then the activation of the FusedConv it
replaces; results differ from fp32 by the rounding of ``dtype``.
Preconditions: ``to-nhwc`` ran (property ``nhwc``: lower-cuda lowers its regions' convs only and adds no layout
fix); shapes propagated. Conv1d/3d, string paddings and non-zero padding modes stay eager, weights converted.

Before: ``y = fused_conv(x)``
After:  ``x1 = x.to(torch.float16, memory_format=torch.channels_last); y = cuda_conv(x1).to(torch.float32)``
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.fused import FusedConv
from fxforge.graph.matching import module_of, replace_submodule
from fxforge.graph.meta import fxmeta, record_rewrite, tensor_shape
from fxforge.numerics import timing
from fxforge.numerics.precision import tf32_policy
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.fragments import compose, register_fragment
from fxforge.pipeline.pass_api import Pass, PassResult, instantiate, register_pass
from fxforge.pipeline.targets import Target, register_target
from fxforge.pipeline.text import parse_pipeline

from . import cuda_graphs  # also registers the cuda-runtime pass
from .edges import cast_inputs, restore_outputs

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_CL = torch.channels_last
FUSED_KERNELS = ("cudnn_relu", "cudnn_add_relu")
ALIGNMENT = 8  # channels per tensor-core tile in channels-last fp16/bf16


def _hardtanh06_(y: torch.Tensor) -> torch.Tensor:
    return F.hardtanh_(y, 0.0, 6.0)


def _hardswish_(y: torch.Tensor) -> torch.Tensor:
    return F.hardswish(y, inplace=True)


def _silu_(y: torch.Tensor) -> torch.Tensor:
    return F.silu(y, inplace=True)


# fused activation -> the same function applied in place (on a conv output nobody else holds yet)
INPLACE_ACTIVATIONS = {"relu": torch.relu_, "relu6": _hardtanh06_, "hardswish": _hardswish_, "silu": _silu_}


def fused_kernel(conv: nn.Conv2d, add: bool, activation: str) -> tuple[str | None, str]:
    """The fused cuDNN kernel for this conv and its post-ops, or (None, why none applies)."""
    if activation != "relu":
        return None, f"post-ops {'add+' if add else ''}{activation or 'none'} (fused kernels end in relu)"
    if conv.groups != 1:
        return None, "grouped"
    if tuple(conv.dilation) != (1, 1):
        return None, "dilated"
    if conv.in_channels % ALIGNMENT or conv.out_channels % ALIGNMENT:
        return None, f"channels not multiples of {ALIGNMENT}"
    return ("cudnn_add_relu" if add else "cudnn_relu"), ""


def fused_kernels_run_on(x: torch.Tensor) -> bool:
    """cuDNN's fused kernels take CUDA tensors only."""
    return x.is_cuda


class CudaConv2d(nn.Module):
    """Conv2d (+ add) (+ activation) with its weight in the compute dtype, channels-last, for the CUDA targets.

    ``kernel`` is "cudnn_relu", "cudnn_add_relu" (fused cuDNN ops, used on CUDA tensors) or "conv2d".
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, add: bool = False, activation: str = "",
                 kernel: str = "conv2d") -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().to(dtype).contiguous(memory_format=_CL))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.add, self.activation, self.kernel = add, activation, kernel

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # an op upstream produced another dtype (e.g. a constant in fp32)
            x = x.to(self.weight.dtype)
        if other is not None and other.dtype != self.weight.dtype:  # cuDNN's fused add takes one dtype
            other = other.to(self.weight.dtype)
        fused = fused_kernels_run_on(x)
        if fused and self.kernel == "cudnn_relu":
            return torch.cudnn_convolution_relu(x, self.weight, self.bias, self.stride, self.padding,
                                                self.dilation, self.groups)
        if fused and self.kernel == "cudnn_add_relu":
            return torch.cudnn_convolution_add_relu(x, self.weight, other, 1.0, self.bias, self.stride,
                                                    self.padding, self.dilation, self.groups)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.add:
            y.add_(other)  # y is fresh: adding in place saves an allocation
        return INPLACE_ACTIVATIONS[self.activation](y) if self.activation else y

    def extra_repr(self) -> str:
        post = "+".join(filter(None, ("add" if self.add else "", self.activation))) or "none"
        return (f"{list(self.weight.shape)}, {self.weight.dtype}, stride={self.stride}, groups={self.groups}, "
                f"post_ops={post!r}, kernel={self.kernel!r}")


# ---------------------------------------------------------------------------------------------- autotune
# the first call of a fused kernel builds its cuDNN plan (and may compile it); samples of 2 back-to-back calls
SCHEDULE = timing.Schedule(warmup=3, rounds=5, calls=2)


def _replayed(run: Callable[[], torch.Tensor], capture: cuda_graphs.Capture) -> Callable[[], Any]:
    """``run`` as the compiled model runs it: the replay of a CUDA graph (at batch 1 an eager call would time
    the kernel launch, not the kernel); ``run`` itself when it cannot be captured."""
    try:
        replay, _ = capture(run, ())
    except Exception:  # capture is how cuda-runtime runs it when it can; eager otherwise
        return run
    return replay


def choose_kernel(module: CudaConv2d, x: torch.Tensor, other: torch.Tensor | None,
                  timer: timing.Timer = timing.cuda_events, *, timed: bool = True,
                  capture: cuda_graphs.Capture = cuda_graphs.capture_cuda_graph) -> str:
    """Run ``module`` with its fused kernel and with "conv2d" on (x, other); with ``timed`` time both, each
    replayed from a CUDA graph, interleaved, and keep the faster (or the one that runs) in ``module.kernel``;
    else keep the fused kernel if it runs. Returns a note for the report."""
    fused, runs, failures = module.kernel, {}, []
    for kernel in (fused, "conv2d") if timed else (fused,):
        run = functools.partial(_run_with_kernel, module, kernel, x, other)
        try:
            run()
        except RuntimeError as exc:  # e.g. no cuDNN engine for this fused graph
            failures.append(f"{kernel} failed ({str(exc).strip().splitlines()[0][:80]})")
        else:
            runs[kernel] = _replayed(run, capture) if timed else run
    if not timed or not runs:  # conv2d failing too: its error shows when the model runs
        module.kernel = fused if fused in runs else "conv2d"
        return "; ".join(failures)
    module.kernel, seconds = timing.fastest(runs, SCHEDULE, timer)
    measured = ", ".join(f"{k} {t * 1e3:.3f} ms" for k, t in seconds.items())
    return "; ".join(filter(None, (measured, *failures)))


def _run_with_kernel(module: CudaConv2d, kernel: str, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    module.kernel = kernel
    return module(x, other)


def _example(shape: torch.Size | None, like: torch.Tensor) -> torch.Tensor | None:
    if shape is None:
        return None
    return torch.randn(tuple(shape), device=like.device, dtype=like.dtype).contiguous(memory_format=_CL)


def _autotune(gm: fx.GraphModule, nodes: list[fx.Node], timer: timing.Timer, *, timed: bool = True,
              tf32: bool = False, capture: cuda_graphs.Capture = cuda_graphs.capture_cuda_graph) -> list[str]:
    """Time each node's fused kernel against "conv2d" (``timed``; else only check that it runs), under the
    runtime's TF32 policy; a summary line, then one line per layer that left its fused kernel (slower or
    failed)."""
    kept, switched = 0, []
    with torch.inference_mode(), tf32_policy(tf32):
        for node in nodes:
            module = module_of(gm, node)
            x = _example(tensor_shape(node.args[0]), module.weight)
            other = _example(tensor_shape(node.args[1]), module.weight) if module.add else None
            if x is None or (module.add and other is None):
                continue  # shape unknown: keep the rule's choice
            fused = module.kernel
            note = choose_kernel(module, x, other, timer, timed=timed, capture=capture)
            if module.kernel == fused:
                kept += 1
            else:
                switched.append(f"  {node.target}: {note} -> {module.kernel}")
    what = "autotune" if timed else "fused kernels checked"
    return [f"{what}: {kept} layer(s) kept their fused kernel, {len(switched)} run conv2d instead", *switched]


# ---------------------------------------------------------------------------------------------- lowering
def _conv_lowering(gm: fx.GraphModule, node: fx.Node, dtype: torch.dtype, fused: bool) -> tuple[CudaConv2d, str] | None:
    """The CudaConv2d replacing ``node`` and why it is not fused ("" when it is), or None to leave it eager."""
    mod = module_of(gm, node)
    conv, add, activation = (mod.conv, mod.add, mod.activation) if isinstance(mod, FusedConv) else (mod, False, "")
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    kernel, why = fused_kernel(conv, add, activation) if fused else (None, "fused=false")
    return CudaConv2d(conv, dtype, add, activation, kernel or "conv2d"), why


def _summary(kernels: Counter, why_not: Counter) -> str:
    done = ", ".join(f"{n} {k}" for k, n in sorted(kernels.items())) or "none"
    reasons = "; ".join(f"{why}: {n}" for why, n in sorted(why_not.items()))
    return f"convs lowered: {done}" + (f" (not fused: {reasons})" if reasons else "")


@register_pass
@dataclass(frozen=True)
class LowerCuda(Pass):
    """Convs -> CudaConv2d (fused cuDNN kernels where they apply), everything in ``dtype``, casts at the edges."""

    name = "lower-cuda"
    requires = frozenset({"nhwc"})  # to-nhwc made every layout change explicit: views read NCHW values already
    provides = frozenset({"lowered"})
    dtype: str = "float16"
    fused: bool = True
    autotune: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.dtype != "float32":  # the numeric check then compares by SQNR, as for int8 graphs
            object.__setattr__(self, "provides", frozenset({"lowered", "reduced-precision"}))

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.shapes(gm)
        dtype = DTYPES[self.dtype]
        kernels, why_not, fused_nodes = Counter(), Counter(), []
        for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
            if fxmeta(node).get("layout") != "channels_last":
                continue  # kept in eager layout by to-nhwc: a channels-last weight would make its output so
            lowered = _conv_lowering(gm, node, dtype, self.fused)
            if lowered is None:
                continue
            module, why = lowered
            replace_submodule(gm, str(node.target), module)
            record_rewrite(node, "lower-cuda", node)
            if why:
                why_not[why] += 1
            else:
                fused_nodes.append(node)
        gm.to(dtype)  # every other floating parameter and buffer (CudaConv2d's are converted already)
        notes = _autotune(gm, fused_nodes, timing.cuda_events, timed=self.autotune, tf32=runtime_tf32(ctx)) \
            if fused_nodes and cuda_graphs.weights_on_gpu(gm) else []
        for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
            module = module_of(gm, node)
            if isinstance(module, CudaConv2d):
                kernels[module.kernel] += 1
        cast_inputs(gm, dtype, "lower-cuda")
        restore_outputs(gm, "lower-cuda")
        return PassResult(gm, True, [f"compute dtype {self.dtype}, weights channels-last",
                                     _summary(kernels, why_not), *notes])


def runtime_tf32(ctx: PassContext) -> bool:
    """The TF32 policy the compiled model will run under: cuda-runtime's ``tf32`` option in this pipeline
    (off when it has none, as eager fp32 on a CPU)."""
    specs = [spec for spec in parse_pipeline(ctx.report.pipeline) if spec.name == cuda_graphs.CudaRuntimePass.name]
    return bool(specs) and instantiate(specs[-1]).tf32


# ---------------------------------------------------------------------------------------------- targets
def cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    return None


def bf16_unavailable_reason() -> str | None:
    reason = cuda_unavailable_reason()
    if reason is None and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name()} has no bfloat16 support (needs compute capability 8.0+): use 'cuda'"
    return reason


# the graph passes of the CUDA targets: everything before their lowering
register_fragment("cuda-graph", "canonicalize,fold-bn,fuse-conv,to-nhwc")
_TARGETS = {
    "cuda": ("fp16", "lower-cuda", cuda_unavailable_reason),
    "cuda-bf16": ("bf16", "lower-cuda{dtype=bfloat16}", bf16_unavailable_reason),
    "cuda-fp32": ("fp32 (TF32 off)", "lower-cuda{dtype=float32}", cuda_unavailable_reason),
}
for _name, (_precision, _lowering, _availability) in _TARGETS.items():
    register_target(Target(
        name=_name,
        description=f"{_precision} on a CUDA GPU: BN folded, conv+relu / conv+add+relu on fused cuDNN kernels, "
                    f"channels-last weights, a CUDA graph per input shape",
        pipeline=compose("cuda-graph", _lowering, "cuda-runtime"),
        device="cuda",
        availability=_availability,
    ))

"""The CUDA backend: targets "cuda" (fp16), "cuda-bf16" and "cuda-fp32"; the lower-cuda pass and its conv module.

lower-cuda{dtype=float16,fused=true,autotune=true} rewrites:
    FusedConv[Conv2d, relu]        =>  CudaConv2d  kernel "cudnn_relu"      (torch.cudnn_convolution_relu)
    FusedConv[Conv2d, add+relu]    =>  CudaConv2d  kernel "cudnn_add_relu"  (torch.cudnn_convolution_add_relu)
    FusedConv[Conv2d, other post-ops] / Conv2d  =>  CudaConv2d  kernel "conv2d"  (F.conv2d, then the add and
                                                    the activation in place on the fresh conv output)
    every other floating-point parameter and buffer  =>  ``dtype``
    each floating graph input x    =>  x.to(dtype, memory_format=channels_last)   (4-d inputs; others: dtype)
    each floating graph output y   =>  y.to(<eager dtype>[, contiguous])  (the dtype and layout eager returned)
    x.view(...) of a value eager had NCHW-contiguous  =>  x.contiguous().view(...)
Weights are converted to ``dtype`` and laid out channels-last once, here; cuDNN then runs channels-last
convolutions (tensor cores in fp16/bf16) without converting a weight per call. Outputs come back in the dtype
eager produced on the example inputs (fp32 for an fp32 model), so the compiled model is a drop-in replacement;
inside, values flow in ``dtype``.

Which kernel, chosen here from the module's attributes: the fused cuDNN ops compute relu(conv(x) + bias) and
relu(conv(x) + z + bias) in one kernel (cuDNN's runtime-fusion engines), and only relu; they are used for
ungrouped, undilated convs whose channel counts are multiples of 8 (tensor-core alignment in channels-last
fp16; a 3-channel stem or a depthwise conv would take a slow or no fused engine: pytorch#68506 measured a
7x7 fused conv 17x slower than conv + relu). With ``autotune`` and a graph on the GPU, each layer that
qualifies is timed with both kernels on its input shape (``fxforge.numerics.timing``: CUDA events, the kernels
interleaved) and keeps the faster; a fused kernel that fails to run falls back to "conv2d". On the CPU
(graph-level tests of this pipeline) nothing is timed, and a CudaConv2d computes its "conv2d" composition
whatever its kernel: the fused ops exist only on CUDA.
Why correct: both kernels compute conv + bias, then the add, then the activation of the FusedConv they
replace; results differ from fp32 eager by the rounding of ``dtype`` (fp16 SQNR is measured by the CUDA tests).
Layout: the CUDA pipelines run ``to-nhwc`` first (property ``nhwc``); lower-cuda then lowers the convs of its
channels-last regions only (a conv it kept in eager layout, whose value may share memory with one mutated in
place, stays an eager Conv2d in ``dtype``: a channels-last weight would make its output channels-last), casts
an input straight to channels-last when only to-nhwc's conversions read it (they become no-ops), folds
to-nhwc's NCHW copy before an output into the cast back, and adds no ``contiguous`` before views. Without
to-nhwc (a pipeline written without it), the rules in the table above apply.
Preconditions: shapes propagated (the eager dtypes and layouts of the outputs come from that metadata).
Conv1d/3d, string paddings and non-zero padding modes stay eager, with their weights converted.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.fused import FusedConv
from fxforge.graph.matching import module_of, replace_submodule
from fxforge.graph.meta import fxmeta, record_rewrite, tensor_shape
from fxforge.numerics import timing
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.fragments import compose, register_fragment
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.targets import Target, register_target

from . import cuda_graphs  # noqa: F401  (registers the cuda-runtime pass)

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
        if x.is_cuda and self.kernel == "cudnn_relu":
            return torch.cudnn_convolution_relu(x, self.weight, self.bias, self.stride, self.padding,
                                                self.dilation, self.groups)
        if x.is_cuda and self.kernel == "cudnn_add_relu":
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


def choose_kernel(module: CudaConv2d, x: torch.Tensor, other: torch.Tensor | None,
                  timer: timing.Timer = timing.cuda_events) -> str:
    """Time ``module`` with its fused kernel and with "conv2d" on (x, other), interleaved; keep the faster (or the
    one that runs) in ``module.kernel``. Returns a note for the report."""
    runs, failures = {}, []
    for kernel in (module.kernel, "conv2d"):
        run = functools.partial(_run_with_kernel, module, kernel, x, other)
        try:
            run()
        except RuntimeError as exc:  # e.g. no cuDNN engine for this fused graph
            failures.append(f"{kernel} failed ({str(exc).strip().splitlines()[0][:80]})")
        else:
            runs[kernel] = run
    if not runs:  # conv2d failing too: its error shows when the model runs
        module.kernel = "conv2d"
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


def _autotune(gm: fx.GraphModule, nodes: list[fx.Node], timer: timing.Timer) -> list[str]:
    """Time each node's fused kernel against "conv2d"; a summary line, then one line per layer that left
    its fused kernel (slower or failed)."""
    kept, switched = 0, []
    with torch.inference_mode():
        for node in nodes:
            module = module_of(gm, node)
            x = _example(tensor_shape(node.args[0]), module.weight)
            other = _example(tensor_shape(node.args[1]), module.weight) if module.add else None
            if x is None or (module.add and other is None):
                continue  # shape unknown: keep the rule's choice
            fused = module.kernel
            note = choose_kernel(module, x, other, timer)
            if module.kernel == fused:
                kept += 1
            else:
                switched.append(f"  {node.target}: {note} -> {module.kernel}")
    return [f"autotune: {kept} layer(s) kept their fused kernel, {len(switched)} run conv2d instead", *switched]


# ---------------------------------------------------------------------------------------------- lowering
def _conv_lowering(gm: fx.GraphModule, node: fx.Node, dtype: torch.dtype, fused: bool) -> tuple[CudaConv2d, str] | None:
    """The CudaConv2d replacing ``node`` and why it is not fused ("" when it is), or None to leave it eager."""
    mod = module_of(gm, node)
    conv, add, activation = (mod.conv, mod.add, mod.activation) if isinstance(mod, FusedConv) else (mod, False, "")
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    kernel, why = fused_kernel(conv, add, activation) if fused else (None, "fused=false")
    return CudaConv2d(conv, dtype, add, activation, kernel or "conv2d"), why


def _floating_meta(node: object) -> Any:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point else None


def _channels_last_input(node: fx.Node, meta: Any, planned: bool) -> bool:
    """Cast this 4-d input straight to channels-last: always without to-nhwc; with it, when its readers are all
    to-nhwc conversions into channels-last (which the cast then makes no-ops: one copy instead of two)."""
    if len(meta.shape) != 4:
        return False
    return not planned or all(fxmeta(u).get("nhwc") == "enter" for u in node.users if u.op != "output")


def _cast_inputs(gm: fx.GraphModule, dtype: torch.dtype, planned: bool) -> None:
    """Each floating input -> ``dtype`` (4-d: also channels-last where it goes) once, at the top of the graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        meta = _floating_meta(node)
        if meta is None:
            continue
        kwargs = {"dtype": dtype, **({"memory_format": _CL} if _channels_last_input(node, meta, planned) else {})}
        with gm.graph.inserting_after(placeholders[-1]):
            cast = gm.graph.call_method("to", (node,), kwargs)
        record_rewrite(cast, "lower-cuda", node)
        # an input returned as it is stays untouched (no round trip through dtype)
        node.replace_all_uses_with(cast, delete_user_cb=lambda user, c=cast: user is not c and user.op != "output")


def _eager_contiguous(meta: Any) -> bool:
    return meta.memory_format == torch.contiguous_format


def _restore_outputs(gm: fx.GraphModule, planned: bool) -> None:
    """Floating outputs -> the dtype eager returned, NCHW-contiguous again where eager had them so (with
    to-nhwc: its copy to NCHW before an output folded into this cast; region outputs it left channels-last
    stay so)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")

    def restore(value: object) -> object:
        meta = _floating_meta(value)
        if meta is None or value.op == "placeholder":
            return value
        source, fmt = value, torch.contiguous_format if _eager_contiguous(meta) else torch.preserve_format
        if planned and fxmeta(value).get("layout") == "channels_last":
            fmt = torch.preserve_format  # to-nhwc{outputs=channels_last} left it so
        elif planned and fxmeta(value).get("nhwc") == "exit" and len(value.users) == 1:
            source = value.args[0]  # cast and make NCHW in one copy
        with gm.graph.inserting_before(output):
            new = gm.graph.call_method("to", (source,), {"dtype": meta.dtype, "memory_format": fmt})
        record_rewrite(new, "lower-cuda", value)
        return new

    output.args = fx.node.map_aggregate(output.args, restore)
    for node in [n for n in gm.graph.nodes if fxmeta(n).get("nhwc") == "exit" and not n.users]:
        gm.graph.erase_node(node)


def _contiguous_before_views(gm: fx.GraphModule) -> None:
    """``.view`` needs strides that channels-last values lack: make values eager had contiguous so again."""
    for node in [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]:
        meta = _floating_meta(node.args[0])
        if meta is not None and len(meta.shape) == 4 and _eager_contiguous(meta):
            with gm.graph.inserting_before(node):
                fixed = gm.graph.call_method("contiguous", (node.args[0],))
            record_rewrite(fixed, "lower-cuda", node.args[0])
            node.replace_input_with(node.args[0], fixed)


def _summary(kernels: Counter, why_not: Counter) -> str:
    done = ", ".join(f"{n} {k}" for k, n in sorted(kernels.items())) or "none"
    reasons = "; ".join(f"{why}: {n}" for why, n in sorted(why_not.items()))
    return f"convs lowered: {done}" + (f" (not fused: {reasons})" if reasons else "")


@register_pass
@dataclass(frozen=True)
class LowerCuda(Pass):
    """Convs -> CudaConv2d (fused cuDNN kernels where they apply), everything in ``dtype``, casts at the edges."""

    name = "lower-cuda"
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
        planned = "nhwc" in ctx.properties  # to-nhwc ran: layouts are explicit in the graph already
        kernels, why_not, fused_nodes = Counter(), Counter(), []
        for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
            if planned and fxmeta(node).get("layout") != "channels_last":
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
        notes = _autotune(gm, fused_nodes, timing.cuda_events) if self.autotune and _on_gpu(gm) else []
        for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
            module = module_of(gm, node)
            if isinstance(module, CudaConv2d):
                kernels[module.kernel] += 1
        _cast_inputs(gm, dtype, planned)
        _restore_outputs(gm, planned)
        if not planned:  # with to-nhwc, views read NCHW values already
            _contiguous_before_views(gm)
        return PassResult(gm, True, [f"compute dtype {self.dtype}, weights channels-last",
                                     _summary(kernels, why_not), *notes])


def _on_gpu(gm: fx.GraphModule) -> bool:
    return any(t.is_cuda for t in gm.parameters()) or any(t.is_cuda for t in gm.buffers())


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

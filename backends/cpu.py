"""The "cpu" backend: fp32 on oneDNN kernels with weights prepacked once and fused post-ops.

lower-cpu rewrites:
    FusedConv[Conv2d, add? act?] / Conv2d  =>  OneDnnConv2d   (mkldnn._convolution_pointwise[.binary])
    FusedLinear[act]                        =>  OneDnnLinear   (mkldnn._linear_pointwise)
    (act: relu, relu6 = hardtanh[0, 6], hardswish, silu = swish; all oneDNN eltwise post-ops)
    Conv2d 1x1 on 1x1 maps (squeeze-excitation)  =>  GemmConv1x1  (MKL GEMM on [N, C]: oneDNN's per-call cost
                                                                  is larger than such a product)
    Linear multiplying >= LINEAR_MIN_ROWS rows          =>  OneDnnLinear   (no post-op; fewer rows, e.g. batch-1
                                                                          heads, stay on eager's MKL GEMM: faster there)
    Conv1D; gelu(linear) / linear + residual  =>  Linear; OneDnnLinear with the post-op (transformer_lowering.py)
Why correct: the oneDNN ops compute conv/linear with the same fp32 weights and apply the post-ops inside
the kernel; results differ from eager only by float summation order. A 1x1 stride-1 conv is a matrix product
over the channels at every pixel (GemmConv1x1 computes it so for any input size, applying add and activation
after it).
Layout: the oneDNN convs run channels-last. lower-cpu requires ``to-nhwc`` before it (property ``nhwc``; a
pipeline without it is refused before anything runs, naming to-nhwc), so every layout conversion is explicit:
lower-cpu lowers the convs of its channels-last regions and adds nothing (a conv to-nhwc kept in eager layout
stays an eager Conv2d).
Preconditions: to-nhwc ran; shapes propagated; fp32 weights. Conv1d/3d, non-zero padding modes and string
paddings stay eager (correct, not yet lowered).

Before: ``y = fused_conv(x)``  (FusedConv[relu])   After: ``y = onednn_conv(x)``  (OneDnnConv2d, post-op relu)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.errors import PluginUnavailableError
from fxforge.graph.fused import FusedConv, FusedLinear
from fxforge.graph.matching import ACTIVATIONS, module_of, replace_submodule
from fxforge.graph.meta import fxmeta, record_rewrite, tensor_shape
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.fragments import compose, register_fragment
from fxforge.pipeline.pass_api import graph_pass
from fxforge.pipeline.targets import Target, register_target

from .transformer_lowering import conv1d_to_linear, fuse_linear_epilogues, rows_of

_mkldnn = torch.ops.mkldnn
_CHANNELS_LAST = torch.channels_last
# fused activation -> oneDNN unary post-op (attr, scalars)
_UNARY = {"": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
          "hardswish": ("hardswish", []), "silu": ("swish", [])}


def _export_scalars(scalars: list[float]) -> list[float]:
    """The post-op scalars as ``torch.export`` can save them: its serializer cannot write an empty ``Scalar?[]``
    (the element type is unknown), and the post-ops fused without scalars (relu, swish, hardswish, gelu) ignore
    the list, so a placeholder scalar changes nothing."""
    return scalars or [0.0]


# torch ships the oneDNN binary (fused add) ops without fake kernels, which torch.export needs to trace them
# (CompiledModule.export); the output has the shape of the added tensor, channels-last for the conv.
@torch.library.register_fake("mkldnn::_convolution_pointwise.binary")
def _conv_binary_fake(x: torch.Tensor, other: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(other, memory_format=_CHANNELS_LAST)


@torch.library.register_fake("mkldnn::_linear_pointwise.binary")
def _linear_binary_fake(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, *args: object) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Prepacked(nn.Module):
    """A module holding an opaque oneDNN weight (``packed_weight``) built by ``_pack`` from ``weight``.

    The opaque tensor has no storage to copy or save, so it is not a buffer: copies and pickles carry the
    dense weight and rebuild the packed one, as do ``load_state_dict`` and ``.to()``.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        # compile works on a private copy of the model, so the tensors are taken over, not copied
        self.register_buffer("weight", layer.weight.detach())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())

    def _pack(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("packed_weight", None)
        state.pop("other_sizes", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._pack()

    # The packed weight is derived from ``weight``: rebuild it whenever the buffers change.
    def _apply(self, fn, recurse: bool = True):  # .to(), .float(), ...
        out = super()._apply(fn, recurse)
        self._pack()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()


MAX_OTHER_SIZES = 4  # input sizes besides the example's that a conv packs its weight for


class OneDnnConv2d(_Prepacked):
    """Conv2d (+ add) (+ activation) on oneDNN with a weight prepacked for the example input size."""

    def __init__(self, conv: nn.Conv2d, add: bool = False, activation: str = "",
                 input_size: list[int] | None = None) -> None:
        super().__init__(conv)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        # dilating a one-tap kernel dimension changes nothing, and oneDNN crashed on some such convs (a 1x1
        # kernel, dilation 2, stride 3, padding 2 on a 4x1 map: a segfault in torch 2.14)
        self.dilation = [1 if k == 1 else d for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        self.groups = conv.groups
        self.binary, self.activation = add, activation
        self.unary, self.unary_scalars = _UNARY[activation]
        self.binary_unary = None if activation == "" else self.unary  # the .binary op's spelling of "none"
        self.input_size = input_size
        self._pack()

    def _pack(self) -> None:
        self.packed_weight = self._pack_for(self.input_size)
        self.packed_size = None if self.input_size is None else tuple(self.input_size)
        self.other_sizes: dict[tuple[int, ...], torch.Tensor] = {}  # input size -> weight packed for it

    def _pack_for(self, input_size: list[int] | None) -> torch.Tensor:
        return _mkldnn._reorder_convolution_weight(
            self.weight, self.padding, self.stride, self.dilation, self.groups, input_size)

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight packed for ``x``'s size. oneDNN may pick a weight layout per input size, and a weight
        packed for another size can then run ~100x slower (measured: regnet_y_8gf's 896-channel, 16-group
        convs on 4x4 maps, packed at batch 2 and run at batch 1: 40 ms instead of 0.3 ms). Other sizes get
        their own packing (up to MAX_OTHER_SIZES of them; past that, the dense weight: eager's speed)."""
        size = x.shape  # torch.Size: a tuple, compared without building a list per call
        if self.input_size is None or size == self.packed_size:
            return self.packed_weight
        packed = self.other_sizes.get(size)
        if packed is None:
            if len(self.other_sizes) >= MAX_OTHER_SIZES:
                return self.weight
            packed = self.other_sizes[size] = self._pack_for(list(size))
        return packed

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous(memory_format=_CHANNELS_LAST)
        weight, scalars = self._operands(x)
        if not self.binary:
            return _mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.unary, scalars, "")
        if other.size(1) == 1 or other.size(2) * other.size(3) == 1:
            # One channel or 1x1 maps: NCHW and NHWC strides coincide, and oneDNN's fused sum fails on these
            # in some torch builds (2.11: "could not create a memory"). Add outside the kernel instead.
            y = _mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "none", _export_scalars([]) if torch.compiler.is_exporting() else [], "") + other
            return ACTIVATIONS[self.activation](y) if self.activation else y
        return _mkldnn._convolution_pointwise.binary(
            x, other, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, self.binary_unary, scalars, "")

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """The weight and post-op scalars of a call: under ``torch.export``, the dense weight (an opaque prepacked
        tensor cannot be saved; oneDNN reorders the dense one per call, with bit-identical results) and
        scalars export can write."""
        if torch.compiler.is_exporting():
            return self.weight, _export_scalars(self.unary_scalars)
        return self._weight_for(x), self.unary_scalars

    def extra_repr(self) -> str:
        post = "+".join(filter(None, ("add" if self.binary else "", self.activation))) or "none"
        return f"{list(self.weight.shape)}, stride={self.stride}, groups={self.groups}, post_ops={post!r}"


# linear epilogues oneDNN fuses besides ACTIVATIONS: name -> (attr, algorithm, eager reference)
GELUS: dict[str, tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "gelu": ("gelu", "none", F.gelu), "gelu_tanh": ("gelu", "tanh", functools.partial(F.gelu, approximate="tanh"))}


def linear_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The eager function of a linear post-op activation (a key of ACTIVATIONS or GELUS)."""
    return GELUS[name][2] if name in GELUS else ACTIVATIONS[name]


class OneDnnLinear(_Prepacked):
    """Linear (+ add) (+ activation) on oneDNN with a prepacked weight, for inputs of any rank.

    ``add``: the call takes a second tensor of the output's shape, added inside the kernel (binary post-op);
    activation: a key of ``_UNARY`` or ``GELUS`` (GELU: erf or tanh form); add and activation are exclusive."""

    def __init__(self, linear: nn.Linear, activation: str = "relu", batch_size: int | None = None,
                 add: bool = False) -> None:
        super().__init__(linear)
        if add and activation:
            raise ValueError("OneDnnLinear fuses an add or an activation, not both")
        self.activation, self.batch_size, self.binary = activation, batch_size, add
        self.unary, self.unary_scalars = _UNARY[activation] if activation in _UNARY else (GELUS[activation][0], [])
        self.algorithm = GELUS[activation][1] if activation in GELUS else ""
        self._pack()

    def _pack(self) -> None:
        self.packed_weight = _mkldnn._reorder_linear_weight(self.weight, self.batch_size)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        exporting = torch.compiler.is_exporting()  # dense weight, savable scalars: see OneDnnConv2d._operands
        weight = self.weight if exporting else self.packed_weight
        if self.binary:
            return _mkldnn._linear_pointwise.binary(x, other, weight, self.bias, "add")
        scalars = _export_scalars(self.unary_scalars) if exporting else self.unary_scalars
        return _mkldnn._linear_pointwise(x, weight, self.bias, self.unary, scalars, self.algorithm)

    def extra_repr(self) -> str:
        return f"{list(self.weight.shape)}, post_ops={('add' if self.binary else self.activation) or 'none'!r}"


# in-place activations, for kernels that compute into a fresh tensor and apply the activation after it
INPLACE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], object]] = {
    "relu": torch.relu_, "relu6": lambda y: y.clamp_(0.0, 6.0),
    "hardswish": lambda y: F.hardswish(y, inplace=True), "silu": lambda y: F.silu(y, inplace=True)}


class GemmConv1x1(nn.Module):
    """A 1x1, stride-1, unpadded, ungrouped conv (+ add) (+ activation) as an MKL GEMM on the channels-last view:
    ``F.linear`` of the [N*H*W, C_in] rows with the [C_out, C_in] weight (for any input size); returns a
    channels-last tensor. ``F.linear``, not ``addmm``: TorchScript's executor splits a traced ``addmm`` into a
    product and an add, which rounds differently, and ``to_torchscript`` checks its trace bit for bit."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, add: bool = False,
                 activation: str = "") -> None:
        super().__init__()
        weight = weight.detach()
        self.register_buffer("weight", weight.reshape(weight.shape[0], -1).contiguous())  # [C_out, C_in]
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.binary, self.activation = add, activation

    @classmethod
    def of(cls, conv: OneDnnConv2d) -> GemmConv1x1:
        """The GEMM computing what the oneDNN ``conv`` computes."""
        return cls(conv.weight, conv.bias, conv.binary, conv.activation)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view of a channels-last input or of 1x1 maps
        y = F.linear(rows, self.weight, self.bias)
        out = y.view(n, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last strides
        if self.binary:
            out.add_(other)
        if self.activation:
            INPLACE_ACTIVATIONS[self.activation](y)
        return out

    def extra_repr(self) -> str:
        post = "+".join(filter(None, ("add" if self.binary else "", self.activation))) or "none"
        return f"{list(self.weight.shape)}, post_ops={post!r}"


def is_pointwise_conv(conv: nn.Conv2d) -> bool:
    """1x1 kernel, stride 1, no padding, one group: a matrix product over the channels at every pixel."""
    return (tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.groups == 1)


def conv_lowering(gm: fx.GraphModule, node: fx.Node, dtype: torch.dtype = torch.float32,
                  module: type[OneDnnConv2d] = OneDnnConv2d) -> nn.Module | None:
    """The oneDNN ``module`` replacing ``node``, or None when it is not a lowerable Conv2d of ``dtype``."""
    mod = module_of(gm, node)
    fused = isinstance(mod, FusedConv)
    conv, add, activation = (mod.conv, mod.add, mod.activation) if fused else (mod, False, "")
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    shape = tensor_shape(node.args[0])
    if conv.weight.dtype != dtype or shape is None or len(shape) != 4:
        return None
    return module(conv, add, activation, list(shape))


def _cpu_conv_lowering(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """As ``conv_lowering``, except a pointwise fp32 conv on 1x1 maps (a squeeze-excitation conv: a linear layer
    on [N, C]), which goes to MKL's GEMM: oneDNN's conv op spends ~20 us per call building its primitive
    descriptor, several times what such a product takes (benchmarks/RESULTS.md, *fp32 cpu: where the time goes*)."""
    mod = module_of(gm, node)
    fused = isinstance(mod, FusedConv)
    conv = mod.conv if fused else mod
    shape = tensor_shape(node.args[0]) if node.args else None
    if (type(conv) is nn.Conv2d and conv.weight.dtype == torch.float32 and is_pointwise_conv(conv)
            and shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1):
        return GemmConv1x1(conv.weight, conv.bias, mod.add if fused else False, mod.activation if fused else "")
    return conv_lowering(gm, node)


LINEAR_MIN_ROWS = 16  # a plain Linear multiplying at least this many rows goes to oneDNN (below: eager's GEMM)


def _linear_lowering(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """FusedLinear -> OneDnnLinear; a plain fp32 Linear too when it multiplies ``LINEAR_MIN_ROWS`` rows or more
    (oneDNN's prepacked GEMM: 1.1-2x eager's on transformer projections; batch-1 heads, one row, lose to eager:
    benchmarks/RESULTS.md)."""
    mod = module_of(gm, node)
    if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and node.args:
        rows = rows_of(node.args[0])
        return OneDnnLinear(mod, "", rows) if rows is not None and rows >= LINEAR_MIN_ROWS else None
    if not isinstance(mod, FusedLinear) or mod.linear.weight.dtype != torch.float32:
        return None
    shape = tensor_shape(node.args[0])
    return OneDnnLinear(mod.linear, mod.activation, shape[0] if shape is not None and len(shape) == 2 else None)


def lower_modules(gm: fx.GraphModule, pass_name: str, conv_lowering: Callable,
                  linear_lowering: Callable) -> dict[str, int]:
    """Replace each conv / linear module call by what ``conv_lowering`` / ``linear_lowering`` return for it
    (None: left as it is); counts per kind. The graph went through to-nhwc (property ``nhwc``): only the convs of
    its channels-last regions are lowered, and the layouts in the graph are already explicit."""
    counts = {"conv": 0, "linear": 0}
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        for kind, lowering in (("conv", conv_lowering), ("linear", linear_lowering)):
            if kind == "conv" and fxmeta(node).get("layout") != "channels_last":
                continue  # to-nhwc kept it in eager layout (it may share memory with a value mutated in place)
            new_module = lowering(gm, node)
            if new_module is not None:
                replace_submodule(gm, str(node.target), new_module)
                record_rewrite(node, pass_name, node)
                counts[kind] += 1
                break  # lowered: the node now calls a oneDNN module
    return counts


Autotuner = Callable[[fx.GraphModule, PassContext], bool]  # notes for the report; True when it switched a layer
# fp32_kernel_choice.py registers itself (it builds on this module's oneDNN modules, so this module cannot import it)
_AUTOTUNERS: dict[str, Autotuner] = {}


def register_autotuner(tuner: Autotuner) -> Autotuner:
    """Make ``tuner`` the step ``lower-cpu{autotune=true}`` runs after lowering (a decorator)."""
    _AUTOTUNERS["lower-cpu"] = tuner
    return tuner


def _autotuner() -> Autotuner:
    if "lower-cpu" not in _AUTOTUNERS:
        raise PluginUnavailableError("lower-cpu{autotune=true} needs fxforge.backends.fp32_kernel_choice, which is "
                                     "not loaded: import fxforge.backends (it registers the kernel choice)")
    return _AUTOTUNERS["lower-cpu"]


@graph_pass(name="lower-cpu", requires=("nhwc",), provides=("lowered",))
def lower_cpu(gm: fx.GraphModule, ctx: PassContext, autotune: bool = False) -> bool:
    """Fused conv/linear modules -> oneDNN modules with prepacked weights. autotune: per layer, an MKL GEMM
    instead where it timed faster (1x1 convs, linears; see fp32_kernel_choice.py)."""
    conv1d = conv1d_to_linear(gm)
    ctx.shapes(gm)
    epilogues = fuse_linear_epilogues(gm, "lower-cpu", OneDnnLinear)
    counts = lower_modules(gm, "lower-cpu", _cpu_conv_lowering, _linear_lowering)
    counts["linear"] += sum(epilogues.values())
    ctx.note(f"lowered {counts['conv']} conv(s) and {counts['linear']} linear(s) to oneDNN"
             + "".join(f", {n} with {op} fused" for op, n in sorted(epilogues.items()))
             + (f"; {conv1d} Conv1D(s) as Linear" if conv1d else ""))
    # --- hook: per-layer timed kernel choice (backends/fp32_kernel_choice.py), opt-in: lower-cpu{autotune=true}
    switched = False
    if autotune:
        switched = _autotuner()(gm, ctx)
    return any(counts.values()) or switched


# the graph passes of the CPU float targets ("cpu", "cpu-bf16"): everything before their lowering
register_fragment("cpu-graph", "canonicalize,attention-to-sdpa,fold-bn,fuse-conv,fuse-linear,to-nhwc")

register_target(Target(
    name="cpu",
    description="fp32 on CPU: BN folded, conv/linear fused with add/activations, oneDNN kernels with prepacked weights",
    pipeline=compose("cpu-graph", "lower-cpu"),
))

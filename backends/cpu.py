"""The "cpu" backend: fp32 on oneDNN kernels with weights prepacked once and fused post-ops.

lower-cpu rewrites:
    FusedConv[Conv2d, add? act?] / Conv2d  =>  OneDnnConv2d   (mkldnn._convolution_pointwise[.binary])
    FusedLinear[act]                        =>  OneDnnLinear   (mkldnn._linear_pointwise)
    (act: relu, relu6 = hardtanh[0, 6], hardswish, silu = swish; all oneDNN eltwise post-ops)
Why correct: the oneDNN ops compute conv/linear with the same fp32 weights and apply the post-ops inside
the kernel; results differ from eager only by float summation order.
Layout: the oneDNN convs run channels-last (measured fastest here). In the "cpu" pipeline ``to-nhwc`` runs
first (property ``nhwc``) and has made every layout conversion explicit: lower-cpu then lowers the convs of its
channels-last regions and adds nothing (a conv to-nhwc kept in eager layout, because its value may share
memory with one mutated in place, stays an eager Conv2d). Without to-nhwc (pipelines written without it),
lower-cpu keeps its own handling: each oneDNN conv converts its input once if needed (a no-op along a chain
of convs; with to-nhwc too, where it costs ~1 us per conv), and values that eager had NCHW-contiguous are made
contiguous again before a ``.view`` (which needs it), before reshapes whose result is mutated in place
(eager's reshape is then a view that carries the mutation back) and at the graph outputs, so users get the
layout eager gives them.
Plain Linear stays on eager's MKL sgemm, which measured faster at batch 1.
Preconditions: shapes propagated; fp32 weights. Conv1d/3d, non-zero padding modes and string paddings
stay eager (still correct, not yet lowered).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from fxforge.graph.fused import FusedConv, FusedLinear
from fxforge.graph.matching import ACTIVATIONS, is_in_place, module_of, replace_submodule
from fxforge.graph.meta import fxmeta, record_rewrite, tensor_shape
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.fragments import compose, register_fragment
from fxforge.pipeline.pass_api import graph_pass
from fxforge.pipeline.targets import Target, register_target

_mkldnn = torch.ops.mkldnn
_CHANNELS_LAST = torch.channels_last
# fused activation -> oneDNN unary post-op (attr, scalars)
_UNARY = {"": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
          "hardswish": ("hardswish", []), "silu": ("swish", [])}


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
        weight = self._weight_for(x)
        if not self.binary:
            return _mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.unary, self.unary_scalars, "")
        if other.size(1) == 1 or other.size(2) * other.size(3) == 1:
            # One channel or 1x1 maps: NCHW and NHWC strides coincide, and oneDNN's fused sum fails on these
            # in some torch builds (2.11: "could not create a memory"). Add outside the kernel instead.
            y = _mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "none", [], "") + other
            return ACTIVATIONS[self.activation](y) if self.activation else y
        return _mkldnn._convolution_pointwise.binary(
            x, other, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, self.binary_unary, self.unary_scalars, "")

    def extra_repr(self) -> str:
        post = "+".join(filter(None, ("add" if self.binary else "", self.activation))) or "none"
        return f"{list(self.weight.shape)}, stride={self.stride}, groups={self.groups}, post_ops={post!r}"


class OneDnnLinear(_Prepacked):
    """Linear + activation on oneDNN with a prepacked weight."""

    def __init__(self, linear: nn.Linear, activation: str = "relu", batch_size: int | None = None) -> None:
        super().__init__(linear)
        self.activation, self.batch_size = activation, batch_size
        self.unary, self.unary_scalars = _UNARY[activation]
        self._pack()

    def _pack(self) -> None:
        self.packed_weight = _mkldnn._reorder_linear_weight(self.weight, self.batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mkldnn._linear_pointwise(x, self.packed_weight, self.bias, self.unary, self.unary_scalars, "")


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


def _linear_lowering(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    mod = module_of(gm, node)
    if not isinstance(mod, FusedLinear) or mod.linear.weight.dtype != torch.float32:
        return None
    shape = tensor_shape(node.args[0])
    return OneDnnLinear(mod.linear, mod.activation, shape[0] if shape is not None and len(shape) == 2 else None)


def _eager_was_contiguous_4d(value: object) -> bool:
    """A rank-4 tensor value that eager produced in the default (NCHW-contiguous) layout.

    The shape metadata was recorded on the eager graph, before lowering made conv outputs channels-last.
    """
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    shape = getattr(meta, "shape", None)  # None too for nodes returning tuples
    return shape is not None and len(shape) == 4 and meta.memory_format == torch.contiguous_format


def _contiguous_before(gm: fx.GraphModule, value: fx.Node, before: fx.Node, pass_name: str) -> fx.Node:
    with gm.graph.inserting_before(before):
        new = gm.graph.call_method("contiguous", (value,))
    record_rewrite(new, pass_name, value)
    return new


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    """flatten / reshape / view: a view of their input on NCHW-contiguous tensors, a copy on channels-last."""
    if node.op == "call_method":
        return node.target in ("flatten", "reshape", "view")
    return (node.op == "call_function" and node.target in (torch.flatten, torch.reshape)) or \
        isinstance(module_of(gm, node), nn.Flatten)


def _mutated_through_reshape(gm: fx.GraphModule, value: fx.Node) -> bool:
    """True when an in-place op mutates ``value`` through a reshape of it (``value.flatten(1).relu_()``):
    eager's mutation reaches ``value`` only while the reshape is a view, i.e. in the NCHW layout."""
    views = [u for u in value.users if _is_reshape(gm, u)]
    while views:
        view = views.pop()
        if any(is_in_place(gm, u) and u.args and u.args[0] is view for u in view.users):
            return True
        views.extend(u for u in view.users if _is_reshape(gm, u))
    return False


def _contiguous_after(gm: fx.GraphModule, value: fx.Node, pass_name: str) -> None:
    """Every reader of ``value`` reads it NCHW-contiguous (one copy, shared: aliasing as in eager)."""
    with gm.graph.inserting_after(value):
        new = gm.graph.call_method("contiguous", (value,))
    value.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    record_rewrite(new, pass_name, value)


def _contiguous_in_eager(output: fx.Node, reference: Any) -> set[fx.Node]:
    """The output values that eager returned as NCHW-contiguous rank-4 tensors (``reference``: its outputs)."""
    nodes, refs = tree_flatten(output.args[0])[0], tree_flatten(reference)[0]
    if len(nodes) != len(refs):
        return set()
    return {n for n, r in zip(nodes, refs, strict=True) if isinstance(n, fx.Node) and isinstance(r, torch.Tensor)
            and r.dim() == 4 and r.is_contiguous()}


def restore_eager_layout(gm: fx.GraphModule, pass_name: str = "lower-cpu", reference: Any = None) -> int:
    """Where eager had NCHW-contiguous tensors, give them back before layout-sensitive uses: ``.view``
    (which fails on channels-last strides), reshapes whose result is mutated in place (the mutation must
    reach the reshaped value, as it does through eager's view) and graph outputs. ``.contiguous()`` is a
    no-op when the value is already contiguous, e.g. when it never passed through a lowered conv.
    Eager's layout comes from the shape metadata, and for the outputs from ``reference`` (eager's outputs)
    when given: graphs whose metadata was propagated after quantization no longer know it.
    Returns the number of ``contiguous`` calls added."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" and _eager_was_contiguous_4d(node) and _mutated_through_reshape(gm, node):
            _contiguous_after(gm, node, pass_name)
            count += 1
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "view" and _eager_was_contiguous_4d(node.args[0]):
            node.replace_input_with(node.args[0], _contiguous_before(gm, node.args[0], node, pass_name))
            count += 1
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    contiguous = _contiguous_in_eager(output, reference) if reference is not None else None

    def restore(value: object) -> object:
        nonlocal count
        if not (_eager_was_contiguous_4d(value) if contiguous is None else value in contiguous):
            return value
        count += 1
        return _contiguous_before(gm, value, output, pass_name)

    output.args = fx.node.map_aggregate(output.args, restore)
    return count


def lower_modules(gm: fx.GraphModule, ctx: PassContext, pass_name: str, conv_lowering: Callable,
                  linear_lowering: Callable) -> dict[str, int]:
    """Replace each conv / linear module call by what ``conv_lowering`` / ``linear_lowering`` return for it
    (None: left as it is); counts per kind. After to-nhwc (property ``nhwc``) only the convs of its
    channels-last regions are lowered and the layouts in the graph are already explicit; without it the
    channels-last outputs of oneDNN convs are made eager's layout again where observable."""
    planned = "nhwc" in ctx.properties
    counts = {"conv": 0, "linear": 0}
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        for kind, lowering in (("conv", conv_lowering), ("linear", linear_lowering)):
            if planned and kind == "conv" and fxmeta(node).get("layout") != "channels_last":
                continue  # to-nhwc kept it in eager layout (it may share memory with a value mutated in place)
            new_module = lowering(gm, node)
            if new_module is not None:
                replace_submodule(gm, str(node.target), new_module)
                record_rewrite(node, pass_name, node)
                counts[kind] += 1
                break  # lowered: the node now calls a oneDNN module
    if counts["conv"] and not planned:
        restore_eager_layout(gm, pass_name)
    return counts


@graph_pass(name="lower-cpu", provides=("lowered",))
def lower_cpu(gm: fx.GraphModule, ctx: PassContext, autotune: bool = False) -> bool:
    """Fused conv/linear modules -> oneDNN modules with prepacked weights. autotune: per layer, an MKL GEMM
    instead where it timed faster (1x1 convs, linears; see fp32_kernel_choice.py)."""
    ctx.shapes(gm)
    counts = lower_modules(gm, ctx, "lower-cpu", conv_lowering, _linear_lowering)
    ctx.note(f"lowered {counts['conv']} conv(s) and {counts['linear']} linear(s) to oneDNN")
    # --- hook: per-layer timed kernel choice (backends/fp32_kernel_choice.py), opt-in: lower-cpu{autotune=true}
    switched = False
    if autotune:
        from fxforge.backends.fp32_kernel_choice import autotune_cpu_kernels  # imports this module
        switched = autotune_cpu_kernels(gm, ctx)
    return any(counts.values()) or switched


# the graph passes of the CPU float targets ("cpu", "cpu-bf16"): everything before their lowering
register_fragment("cpu-graph", "canonicalize,attention-to-sdpa,fold-bn,fuse-conv,fuse-linear,to-nhwc")

register_target(Target(
    name="cpu",
    description="fp32 on CPU: BN folded, conv/linear fused with add/activations, oneDNN kernels with prepacked weights",
    pipeline=compose("cpu-graph", "lower-cpu"),
))

"""Random model graphs for fuzzing a compiler: a hypothesis strategy and the nn.Module that runs a drawn graph.

``graphs()`` draws a ``FuzzGraph``: an input shape, a batch size and a list of ``Op`` s, each reading one or
more earlier values (``srcs`` index the values computed so far, 0 being the input), so graphs have branches,
residual adds, broadcast multiplies, concatenations, values with several users and several outputs.
``FuzzModel(graph)`` is an nn.Module that runs it (torch.fx traces through its loop, leaving exactly the
drawn ops). Ops: Conv2d and ConvTranspose2d (groups, strides, dilation, paddings, padding modes), BatchNorm,
activations in every spelling (modules, functions, methods, in place or not), add / mul (broadcast too), cat,
pooling, linear, flatten in its spellings, unflatten. Shapes include 1 channel, 1-pixel and odd sizes, batch
1 and 3. Weights are scaled by 1/sqrt(fan_in) and BatchNorm statistics estimated on random data, then
perturbed: activations stay near unit scale (a fair int8 reference) and BN is never the identity.
``graphs()`` narrows on request (``OpChoices``, ``input_sizes``) and can add structure (``residual_blocks``,
``extra_output``, ``head``); its defaults are the distribution of the fuzz suite's fixed examples.
A graph's ``repr`` is valid Python, so a failing example pastes straight into a regression test.
Needs hypothesis (a test extra): ``from fxforge.testing import graphs, FuzzModel``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

MAX_CHANNELS = 16
MAX_SIDE = 16
MAX_FEATURES = 256
INPUT_SIZES = ((1, 1, 2, 3, 4, 8), (1, 3, 4, 5, 7, 8, 9, 11), (1, 3, 5, 6, 7, 9, 12))  # channels, height, width

Shape = tuple[int, ...]  # a value's shape without the batch dimension: (C, H, W) or (F,)


@dataclass(frozen=True)
class Op:
    """One op of a drawn graph: ``kind`` (see the module docstring), the values it reads, its options."""

    kind: str
    srcs: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FuzzGraph:
    """A drawn model: input shape (without batch), batch size, ops, the values returned, a weight seed."""

    shape: Shape
    batch: int
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    seed: int = 0

    def example(self, batch: int | None = None, seed: int = 1) -> torch.Tensor:
        """A random input of ``batch`` (default: the graph's) samples."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch or self.batch, *self.shape, generator=g)

    def kinds(self) -> set[str]:
        return {op.kind for op in self.ops}


# --- running one op -------------------------------------------------------------------------------------------

_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
                "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}
_ACT_FUNCTIONS = {"relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu,
                  "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu}
_ACT_INPLACE_ARG = {"relu", "relu6", "hardswish", "silu"}  # modules and functions with an ``inplace`` argument
_ACT_TENSOR_METHODS = {"relu", "sigmoid", "tanh"}  # x.relu() / x.relu_(), x.sigmoid() / x.sigmoid_(), ...
ACT_SPELLINGS = ("module", "module-inplace", "F", "F-inplace", "torch", "method", "method-inplace")
_BINARY = {
    "add": {"op": operator.add, "torch": torch.add, "method": lambda a, b: a.add(b)},
    "mul": {"op": operator.mul, "torch": torch.mul, "method": lambda a, b: a.mul(b)},
}
BINARY_SPELLINGS = ("op", "torch", "method", "inplace")
# run, but drawn only when OpChoices asks for them: torch.relu_ / sigmoid_ / tanh_, a.add_(b) / a.mul_(b)
MORE_ACT_SPELLINGS = ("torch-inplace",)
MORE_BINARY_SPELLINGS = ("method-inplace",)
_INPLACE_BINARY = ("inplace", "method-inplace")
FLATTEN_SPELLINGS = ("module", "torch", "method", "reshape", "view")


def _make_module(op: Op, src_shape: Shape) -> nn.Module | None:
    """The module an op calls (None for function-only ops)."""
    p = op.params
    if op.kind == "conv":
        return nn.Conv2d(src_shape[0], **p)
    if op.kind == "conv_t":
        return nn.ConvTranspose2d(src_shape[0], **p)
    if op.kind == "bn":
        return (nn.BatchNorm2d if len(src_shape) == 3 else nn.BatchNorm1d)(src_shape[0], affine=p["affine"])
    if op.kind == "linear":
        return nn.Linear(src_shape[-1], p["out_features"], bias=p["bias"])
    if op.kind == "act" and p["spelling"].startswith("module"):
        inplace = dict(inplace=p["spelling"] == "module-inplace") if p["fn"] in _ACT_INPLACE_ARG else {}
        return _ACT_MODULES[p["fn"]](**inplace)
    if op.kind == "pool" and p["spelling"] == "module":
        return _pool_module(p)
    if op.kind == "flatten" and p["spelling"] == "module":
        return nn.Flatten()
    if op.kind == "unflatten" and p["spelling"] == "module":
        return nn.Unflatten(1, p["to"])
    return None


def _pool_module(p: dict[str, Any]) -> nn.Module:
    kind, args = p["pool"], dict(p["args"])
    return {"max": nn.MaxPool2d, "avg": nn.AvgPool2d, "adaptive_avg": nn.AdaptiveAvgPool2d,
            "adaptive_max": nn.AdaptiveMaxPool2d}[kind](**args)


_POOL_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "max": F.max_pool2d, "avg": F.avg_pool2d, "adaptive_avg": F.adaptive_avg_pool2d,
    "adaptive_max": F.adaptive_max_pool2d,
}


def _act(p: dict[str, Any], x: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    fn, spelling = p["fn"], p["spelling"]
    if module is not None:
        return module(x)
    inplace = spelling.endswith("inplace")
    if spelling.startswith("method") and fn in _ACT_TENSOR_METHODS:
        return getattr(x, f"{fn}_" if inplace else fn)()
    if spelling.startswith("torch") and fn in _ACT_TENSOR_METHODS:  # torch.relu / torch.relu_, sigmoid, tanh
        return getattr(torch, f"{fn}_" if inplace else fn)(x)
    if fn in _ACT_INPLACE_ARG:  # F.relu6(x, inplace=...) and the like
        return _ACT_FUNCTIONS[fn](x, inplace=inplace)
    if inplace and fn in _ACT_TENSOR_METHODS:  # F-inplace of sigmoid / tanh: torch.sigmoid_
        return getattr(torch, f"{fn}_")(x)
    return _ACT_FUNCTIONS[fn](x)  # gelu has no in-place form


def _binary(kind: str, spelling: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if spelling == "inplace":  # a is at least as large as b (the strategy makes sure)
        if kind == "add":
            a += b
        else:
            a *= b
        return a
    if spelling == "method-inplace":
        return a.add_(b) if kind == "add" else a.mul_(b)
    return _BINARY[kind][spelling](a, b)


def _pool(p: dict[str, Any], x: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    if module is not None:
        return module(x)
    if p["pool"] == "mean":
        return x.mean((2, 3), keepdim=True) if p["spelling"] == "method" else torch.mean(x, (2, 3), keepdim=True)
    return _POOL_FUNCTIONS[p["pool"]](x, **dict(p["args"]))


def _flatten(spelling: str, x: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    if module is not None:
        return module(x)
    return {"torch": lambda: torch.flatten(x, 1), "method": lambda: x.flatten(1),
            "reshape": lambda: x.reshape(x.size(0), -1), "view": lambda: x.view(x.shape[0], -1)}[spelling]()


def _unflatten(p: dict[str, Any], x: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    if module is not None:
        return module(x)
    if p["spelling"] == "view":
        return x.view(-1, *p["to"])
    return x.reshape(x.size(0), *p["to"])


def run_op(op: Op, args: list[torch.Tensor], module: nn.Module | None) -> torch.Tensor:
    """Apply ``op`` to the values it reads (``module`` from ``_make_module``)."""
    p = op.params
    if op.kind in ("conv", "conv_t", "bn", "linear"):
        return module(args[0])
    if op.kind == "act":
        return _act(p, args[0], module)
    if op.kind in ("add", "mul"):
        return _binary(op.kind, p["spelling"], *args)
    if op.kind == "cat":
        return torch.cat(args, dim=p["dim"])
    if op.kind == "pool":
        return _pool(p, args[0], module)
    if op.kind == "flatten":
        return _flatten(p["spelling"], args[0], module)
    if op.kind == "unflatten":
        return _unflatten(p, args[0], module)
    raise ValueError(f"unknown op kind {op.kind!r}")


# --- the model -----------------------------------------------------------------------------------------------


class FuzzModel(nn.Module):
    """Runs a FuzzGraph. Built in eval mode, weights scaled by 1/sqrt(fan_in), BatchNorm stats realistic."""

    def __init__(self, graph: FuzzGraph) -> None:
        super().__init__()
        self.graph = graph
        shapes = graph_shapes(graph)
        for i, op in enumerate(graph.ops):
            module = _make_module(op, shapes[op.srcs[0]])
            if module is not None:
                self.add_module(f"{op.kind}{i + 1}", module)
        g = torch.Generator().manual_seed(graph.seed)
        _init_weights(self, g)
        _set_batchnorm_statistics(self, graph, g)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = [x]
        for i, op in enumerate(self.graph.ops):
            module = getattr(self, f"{op.kind}{i + 1}", None)
            values.append(run_op(op, [values[s] for s in op.srcs], module))
        outputs = tuple(values[i] for i in self.graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    @torch.no_grad()
    def forward_with_rounding_noise(self, x: torch.Tensor, bits: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """The outputs when the input and every op's output carry rounding-sized noise: uniform noise of one
        ``bits``-bit step of that value's range (what per-tensor int8 quantization adds at each point).

        Comparing these with the clean outputs tells how much any int8 compile of this graph can keep: a graph
        whose output is a near-cancellation of large intermediate values (two 1x1 convs whose product of
        weights is ~0) turns rounding noise into noise larger than its output, whatever the compiler does."""
        g = torch.Generator().manual_seed(seed)

        def noisy(v: torch.Tensor) -> torch.Tensor:
            if not v.is_floating_point() or v.numel() == 0:
                return v
            step = (v.max() - v.min()).clamp_min(1e-12) / (2 ** bits - 1)
            return v + (torch.rand(v.shape, generator=g) - 0.5) * step

        values = [noisy(x)]
        for i, op in enumerate(self.graph.ops):
            module = getattr(self, f"{op.kind}{i + 1}", None)
            values.append(noisy(run_op(op, [values[s] for s in op.srcs], module)))  # in-place ops as in forward
        return tuple(values[i] for i in self.graph.outputs)


@torch.no_grad()
def _init_weights(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else _conv_t_fan_in(m)
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)


def _conv_t_fan_in(m: nn.ConvTranspose2d) -> float:
    """Inputs that reach one output of a transposed conv: in-channels per group x kernel taps per stride."""
    taps = m.weight.shape[2] * m.weight.shape[3] / (m.stride[0] * m.stride[1])
    return max(1.0, m.weight.shape[0] / m.groups * taps)


@torch.no_grad()
def _set_batchnorm_statistics(model: FuzzModel, graph: FuzzGraph, g: torch.Generator) -> None:
    """BN statistics from random data (train mode, cumulative average), then perturbed: means shifted, variances
    scaled by 0.5-2 (at least 0.01: a near-constant channel would otherwise amplify rounding 300x), random
    affine parameters. Activations stay near unit scale and BN is never the identity (which hides bad folds)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    model(torch.randn(8, *graph.shape, generator=g))
    for bn in bns:
        c = bn.num_features
        bn.running_mean.add_(torch.randn(c, generator=g) * 0.2 * bn.running_var.sqrt())
        bn.running_var.mul_(torch.rand(c, generator=g) * 1.5 + 0.5).clamp_(min=1e-2)
        if bn.affine:
            sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
            bn.weight.copy_(sign * (torch.rand(c, generator=g) + 0.5))
            bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
        bn.momentum = 0.1


def graph_shapes(graph: FuzzGraph) -> list[Shape]:
    """The shape (without batch) of every value, found by running the ops on one zero sample."""
    shapes = [graph.shape]
    for op in graph.ops:
        shapes.append(op_shape(op, [shapes[s] for s in op.srcs]))
    return shapes


@torch.no_grad()
def op_shape(op: Op, src_shapes: list[Shape]) -> Shape:
    """The shape ``op`` computes from values of ``src_shapes`` (run on one zero sample)."""
    module = _make_module(op, src_shapes[0])
    if module is not None:
        module.eval()
    return tuple(run_op(op, [torch.zeros(1, *s) for s in src_shapes], module).shape[1:])


# --- drawing ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpChoices:
    """What ``graphs()`` draws ops from (a kind listed twice is drawn twice as often). The defaults are the fuzz
    suite's distribution; a property test narrows them, e.g. to conv / bn / relu / add / cat."""

    kinds: tuple[str, ...] = ("conv", "conv", "conv", "conv_t", "bn", "act", "act", "add", "mul", "cat", "pool",
                              "pool", "linear", "flatten", "unflatten")
    activations: tuple[str, ...] = tuple(_ACT_MODULES)
    act_spellings: tuple[str, ...] = ACT_SPELLINGS
    binary_spellings: tuple[str, ...] = BINARY_SPELLINGS
    pools: tuple[str, ...] = ("max", "max", "avg", "avg", "adaptive_avg", "adaptive_max", "mean")
    conv_paddings: tuple[str, ...] = ("int", "int", "same", "valid")  # "int": 0-2 (enough for a 1-pixel output)
    padding_modes: tuple[str, ...] = ("zeros", "zeros", "reflect", "replicate", "circular")
    conv_channels: int = MAX_CHANNELS  # the most output channels a conv draws


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _out_side(side: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (side + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def _draw_conv(draw: st.DrawFn, shape: Shape, choices: OpChoices) -> dict[str, Any]:
    cin, h, w = shape
    groups = draw(st.sampled_from(_divisors(cin)))
    out = groups * draw(st.integers(1, max(1, choices.conv_channels // groups)))
    kh = draw(st.sampled_from([1, 2, 3, 3]))
    kw = kh if draw(st.integers(0, 3)) else draw(st.sampled_from([1, 2, 3]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    padding: Any = draw(st.sampled_from(choices.conv_paddings))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 1, 2, 3]))
    mode = draw(st.sampled_from(choices.padding_modes))
    if padding == "int":
        padding = draw(st.integers(0, 2))
    extents = [dilation * (k - 1) + 1 for k in (kh, kw)]
    if padding == "valid":
        padding, mode = ("valid", "zeros") if all(e <= n for e, n in zip(extents, (h, w), strict=True)) else (0, mode)
    pads = _conv_pads(padding, (kh, kw), dilation)
    if isinstance(padding, int):  # the output keeps at least one pixel per side
        padding = max(padding, *(math.ceil((e - n) / 2) for e, n in zip(extents, (h, w), strict=True)))
        pads = (padding, padding)
    if mode in ("reflect", "circular") and any(p >= n for p, n in zip(pads, (h, w), strict=True)):
        mode = "zeros"  # reflect and circular need padding smaller than the input
    return dict(out_channels=out, kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=draw(st.booleans()), padding_mode=mode)


def _conv_pads(padding: Any, kernel: tuple[int, int], dilation: int) -> tuple[int, int]:
    """The largest one-sided padding per spatial dim."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        return tuple(math.ceil(dilation * (k - 1) / 2) for k in kernel)  # type: ignore[return-value]
    return padding, padding


def _draw_conv_t(draw: st.DrawFn, shape: Shape) -> dict[str, Any]:
    cin = shape[0]
    groups = draw(st.sampled_from(_divisors(cin)))
    out = groups * draw(st.integers(1, max(1, 8 // groups)))
    k, stride, dilation = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, dilation * (k - 1) // 2))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    return dict(out_channels=out, kernel_size=k, stride=stride, padding=padding, output_padding=output_padding,
                groups=groups, bias=draw(st.booleans()), dilation=dilation)


def _draw_same_conv(draw: st.DrawFn, shape: Shape) -> dict[str, Any]:
    """A conv that keeps its input's shape, as in residual blocks."""
    cin = shape[0]
    groups = draw(st.sampled_from(_divisors(cin)))
    k, dilation = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]))
    return dict(out_channels=cin, kernel_size=(k, k), stride=1, padding=dilation * (k - 1) // 2, dilation=dilation,
                groups=groups, bias=draw(st.booleans()), padding_mode="zeros")


def _draw_pool(draw: st.DrawFn, shape: Shape, pools: tuple[str, ...]) -> dict[str, Any]:
    _, h, w = shape
    pool = draw(st.sampled_from(pools))
    spelling = draw(st.sampled_from(["method", "torch"] if pool == "mean" else ["module", "F"]))
    if pool.startswith("adaptive"):
        size = draw(st.sampled_from([1, 2, (1, 2), (2, 1), 3]))
        return dict(pool=pool, spelling=spelling, args=(("output_size", size),))
    if pool == "mean":
        return dict(pool=pool, spelling=spelling)
    k = min(draw(st.sampled_from([1, 2, 3])), h, w) if min(h, w) > 0 else 1
    stride = draw(st.sampled_from([None, 1, 2]))
    padding = draw(st.integers(0, k // 2))
    args = [("kernel_size", k), ("stride", stride), ("padding", padding), ("ceil_mode", draw(st.booleans()))]
    if pool == "avg":
        args.append(("count_include_pad", draw(st.booleans())))
        args.append(("divisor_override", draw(st.sampled_from([None, None, None, 2]))))
    return dict(pool=pool, spelling=spelling, args=tuple(args))


@dataclass
class _Drawn:
    """Values drawn so far (their shapes) and the ops that computed them."""

    shapes: list[Shape]
    choices: OpChoices
    ops: list[Op] = field(default_factory=list)

    @property
    def newest(self) -> int:
        return len(self.shapes) - 1

    def pick(self, draw: st.DrawFn, where: Callable[[Shape], bool] = lambda s: True) -> int | None:
        """A value satisfying ``where``: the newest one half of the time (chains), any other the rest."""
        choices = [i for i, s in enumerate(self.shapes) if where(s)]
        if not choices:
            return None
        newest = choices[-1]
        return newest if draw(st.booleans()) else draw(st.sampled_from(choices))

    def push(self, op: Op) -> None:
        self.shapes.append(op_shape(op, [self.shapes[s] for s in op.srcs]))
        self.ops.append(op)


def _image(s: Shape) -> bool:
    return len(s) == 3


def _features(s: Shape) -> bool:
    return len(s) == 1


def _broadcasts_into(small: Shape, big: Shape) -> bool:
    return len(small) == len(big) and all(a in (1, b) for a, b in zip(small, big, strict=True))


def _draw_binary(draw: st.DrawFn, values: _Drawn, kind: str) -> Op | None:
    a = values.pick(draw)
    shape = values.shapes[a]
    smaller = [i for i, s in enumerate(values.shapes) if s != shape and _broadcasts_into(s, shape)]
    # half of the time a (C, 1, 1) value gates a (C, H, W) one, as in squeeze-excitation
    b = draw(st.sampled_from(smaller)) if smaller and draw(st.booleans()) else values.pick(draw, lambda s: s == shape)
    spelling = draw(st.sampled_from(values.choices.binary_spellings))
    srcs = (a, b) if spelling in _INPLACE_BINARY or draw(st.booleans()) else (b, a)
    return Op(kind, srcs, dict(spelling=spelling))


def _draw_cat(draw: st.DrawFn, values: _Drawn) -> Op | None:
    a = values.pick(draw)
    shape = values.shapes[a]
    same = [i for i, s in enumerate(values.shapes) if s[1:] == shape[1:] and len(s) == len(shape)]
    srcs = [a, *draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))]
    while len(srcs) > 2 and sum(values.shapes[i][0] for i in srcs) > MAX_CHANNELS:
        srcs.pop()
    if sum(values.shapes[i][0] for i in srcs) > (MAX_CHANNELS if _image(shape) else MAX_FEATURES):
        return None
    return Op("cat", tuple(srcs), dict(dim=draw(st.sampled_from([1, -len(shape)]))))


def _draw_unflatten(draw: st.DrawFn, values: _Drawn, src: int) -> Op | None:
    n = values.shapes[src][0]
    c = draw(st.sampled_from([d for d in _divisors(n) if d <= MAX_CHANNELS]))
    h = draw(st.sampled_from([d for d in _divisors(n // c) if d <= MAX_SIDE]))
    w = n // c // h
    if w > MAX_SIDE:
        return None
    return Op("unflatten", (src,), dict(to=(c, h, w), spelling=draw(st.sampled_from(["module", "reshape", "view"]))))


def _draw_op(draw: st.DrawFn, values: _Drawn) -> Op | None:
    """One op of a random kind, or None when the drawn kind does not fit the values there are."""
    kind = draw(st.sampled_from(values.choices.kinds))
    if kind in ("add", "mul"):
        return _draw_binary(draw, values, kind)
    if kind == "cat":
        return _draw_cat(draw, values)
    if kind == "act":
        return _draw_act(draw, values, values.pick(draw))
    if kind == "bn":
        return Op("bn", (values.pick(draw),), dict(affine=draw(st.booleans())))
    if kind == "linear":
        src = values.pick(draw, lambda s: _features(s) or s[-1] <= MAX_SIDE)
        wide = _features(values.shapes[src])
        return Op("linear", (src,), dict(out_features=draw(st.integers(1, 32 if wide else 8)),
                                         bias=draw(st.booleans())))
    if kind == "flatten":
        src = values.pick(draw, lambda s: _image(s) and math.prod(s) <= MAX_FEATURES)
        return None if src is None else Op("flatten", (src,), dict(spelling=draw(st.sampled_from(FLATTEN_SPELLINGS))))
    if kind == "unflatten":
        src = values.pick(draw, _features)
        return None if src is None else _draw_unflatten(draw, values, src)
    return _draw_image_op(draw, values, kind)


def _draw_image_op(draw: st.DrawFn, values: _Drawn, kind: str) -> Op | None:
    if kind == "conv_t":
        src = values.pick(draw, lambda s: _image(s) and max(s[1:]) <= MAX_SIDE // 2)
        return None if src is None else Op("conv_t", (src,), _draw_conv_t(draw, values.shapes[src]))
    src = values.pick(draw, _image)
    if src is None:
        return None
    shape = values.shapes[src]
    choices = values.choices
    params = _draw_conv(draw, shape, choices) if kind == "conv" else _draw_pool(draw, shape, choices.pools)
    return Op(kind, (src,), params)


def _draw_act(draw: st.DrawFn, values: _Drawn, src: int) -> Op:
    choices = values.choices
    fn, spelling = draw(st.sampled_from(choices.activations)), draw(st.sampled_from(choices.act_spellings))
    return Op("act", (src,), dict(fn=fn, spelling=spelling))


def _push_block(draw: st.DrawFn, values: _Drawn) -> None:
    """A block on the newest image value, as CNNs are built: conv (same shape) [-> bn], then an activation, a
    residual add (+ a value of that shape) or both, so that every conv fusion gets drawn."""
    src = next((i for i in reversed(range(len(values.shapes))) if _image(values.shapes[i])), None)
    if src is None:
        return
    values.push(Op("conv", (src,), _draw_same_conv(draw, values.shapes[src])))
    if draw(st.booleans()):
        values.push(Op("bn", (values.newest,), dict(affine=draw(st.booleans()))))
    tail = draw(st.sampled_from(["add", "act", "add-act"]))
    if tail.startswith("add"):
        values.push(_draw_residual_add(draw, values))
    if tail.endswith("act"):
        values.push(_draw_act(draw, values, values.newest))


def _draw_residual_add(draw: st.DrawFn, values: _Drawn) -> Op:
    """The newest value + another value of its shape (itself when there is none: a + a, which standalone adds
    draw too)."""
    a = values.newest
    others = [i for i, s in enumerate(values.shapes) if s == values.shapes[a] and i != a]
    b = draw(st.sampled_from(others)) if others else a
    spelling = draw(st.sampled_from(values.choices.binary_spellings))
    return Op("add", (a, b) if spelling in _INPLACE_BINARY or draw(st.booleans()) else (b, a), dict(spelling=spelling))


def _push_head(draw: st.DrawFn, values: _Drawn, outputs: list[int]) -> None:
    """A classifier head on one image output, which it replaces: [2x2 max-pool (ceil_mode) ->] flatten -> linear."""
    images = [i for i, value in enumerate(outputs) if _image(values.shapes[value])]
    if not images:
        return
    at = draw(st.sampled_from(images))
    pool = draw(st.sampled_from(["", "module", "F"]))
    if pool:
        args = (("kernel_size", 2), ("stride", None), ("padding", 0), ("ceil_mode", True))
        values.push(Op("pool", (outputs[at],), dict(pool="max", spelling=pool, args=args)))
    flatten_src = values.newest if pool else outputs[at]
    values.push(Op("flatten", (flatten_src,), dict(spelling="torch")))
    values.push(Op("linear", (values.newest,), dict(out_features=draw(st.integers(4, 10)), bias=True)))
    outputs[at] = values.newest


def _draw_outputs(draw: st.DrawFn, values: _Drawn, extra_output: bool) -> list[int]:
    """The last value, and half of the time every value no op read (else those are dead code); with
    ``extra_output``, half of the time one more: any value."""
    read = {s for op in values.ops for s in op.srcs}
    last = len(values.ops)
    outputs = [last, *(i for i in range(1, last) if i not in read)] if draw(st.booleans()) else [last]
    if extra_output and draw(st.booleans()):
        outputs.append(draw(st.integers(0, last)))
    return outputs


@st.composite
def graphs(draw: st.DrawFn, max_ops: int = 8, batches: tuple[int, ...] = (1, 3), choices: OpChoices = OpChoices(),
           input_sizes: tuple[tuple[int, ...], ...] = INPUT_SIZES, residual_blocks: bool = False,
           extra_output: bool = False, head: bool = False) -> FuzzGraph:
    """Random FuzzGraphs of 1..``max_ops`` steps on an image input (channels, height and width drawn from
    ``input_sizes``), returning the last value (and any value no op read, half of the time: several outputs; the
    other half such values are dead code). A step is one op drawn from ``choices``, or with ``residual_blocks`` a
    quarter of the time a block (2-4 ops, see ``_push_block``). ``extra_output``: half of the time one more
    output, any value (the input, one read elsewhere, a repeat). ``head``: one image output goes through a
    classifier head."""
    shape = tuple(draw(st.sampled_from(sizes)) for sizes in input_sizes)
    values = _Drawn([shape], choices)
    for _ in range(draw(st.integers(1, max_ops))):
        if residual_blocks and draw(st.integers(0, 3)) == 0:
            _push_block(draw, values)
            continue
        op = _draw_op(draw, values)
        if op is not None:
            values.push(op)
    if not values.ops:
        values.push(Op("act", (0,), dict(fn="relu", spelling="torch")))
    outputs = _draw_outputs(draw, values, extra_output)
    if head:
        _push_head(draw, values, outputs)
    return FuzzGraph(shape, draw(st.sampled_from(batches)), tuple(values.ops), tuple(outputs),
                     draw(st.integers(0, 2**16)))

"""lower-cpu{autotune=true}: per layer, keep lower-cpu's oneDNN kernel or switch to an MKL GEMM, whichever is faster.

Runs at the end of ``lower-cpu`` when its ``autotune`` option is on (off by default) and rewrites a layer only
when the alternative timed faster on this machine at compile time (random input of the layer's recorded shape,
at the current thread count):
    OneDnnConv2d 1x1, stride 1, no padding, groups 1  =>  GemmConv1x1   (F.linear on the [N*H*W, C] view)
    OneDnnLinear (linear + activation)                =>  GemmLinear    (torch.addmm, weight pre-transposed)
    nn.Linear (left on eager's F.linear by lower-cpu)  =>  OneDnnLinear (prepacked, no post-op) or GemmLinear
Why correct: a 1x1 stride-1 unpadded conv on a channels-last tensor is the matrix product of its free
[N*H*W, C_in] view with the [C_in, C_out] weight; bias, residual add and activation are then applied in place,
as oneDNN's post-ops do. Results differ only by float summation order; GemmConv1x1 returns the channels-last
tensor OneDnnConv2d would.
Why opt-in: the winner depends on shape, thread count and machine, and whole models moved by less than the
run-to-run noise (benchmarks/RESULTS.md, *fp32 per-layer kernel choice*); the default keeps a deterministic
module structure. A switch needs a ``MARGIN`` lead; layers of equal kernel, shapes and post-ops share one timing.
Preconditions: lower-cpu's lowering ran; shapes propagated. A module called from several nodes is left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import fx, nn

from fxforge.backends.cpu import (
    INPLACE_ACTIVATIONS,
    GemmConv1x1,
    OneDnnConv2d,
    OneDnnLinear,
    register_autotuner,
)
from fxforge.graph.matching import module_of, replace_submodule
from fxforge.graph.meta import record_rewrite, tensor_shape
from fxforge.numerics import timing
from fxforge.pipeline.context import PassContext
from fxforge.progress import bar

# oneDNN builds its primitive on the first call; then the best of 5 calls per candidate, interleaved
SCHEDULE = timing.Schedule(warmup=2, rounds=5)
MARGIN = 0.05  # an alternative replaces the current kernel only when the current one takes this much longer

class GemmLinear(nn.Module):
    """Linear (+ activation) as torch.addmm with the weight transposed once ([in, out], contiguous)."""

    def __init__(self, linear: nn.Module, activation: str = "") -> None:
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.mm(rows, self.weight_t) if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)
        if self.activation:
            INPLACE_ACTIVATIONS[self.activation](y)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"{list(self.weight_t.shape)}, post_ops={self.activation or 'none'!r}"


seconds_per_call: timing.Timer = timing.wall_clock  # the clock (tests replace it with a fake one)


def fastest(candidates: dict[str, Callable[[], object]], timer: timing.Timer | None = None) -> tuple[str, dict]:
    """(name, {name: seconds}) of the candidate to keep, timed by ``timing.fastest``. The first candidate is the
    incumbent: another wins only when clearly faster (``MARGIN``) and the fastest of those."""
    return timing.fastest(candidates, SCHEDULE, timer or seconds_per_call, MARGIN)


def _example(shape: torch.Size) -> torch.Tensor:
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _is_gemm_conv(module: OneDnnConv2d) -> bool:
    return (tuple(module.weight.shape[2:]) == (1, 1) and module.stride == [1, 1] and module.padding == [0, 0]
            and module.groups == 1)


def _alternatives(gm: fx.GraphModule, node: fx.Node) -> dict[str, tuple[nn.Module, tuple]] | None:
    """{kernel name: (module, example args)} for ``node``, the current module first; None: nothing to choose."""
    module = module_of(gm, node)
    shape = tensor_shape(node.args[0]) if node.args else None
    if shape is None or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    x = _example(shape)
    if isinstance(module, OneDnnConv2d) and _is_gemm_conv(module) and len(shape) == 4:
        args = (x,)
        if module.binary:
            other_shape = tensor_shape(node.args[1]) if len(node.args) > 1 else None
            if other_shape is None:
                return None
            args = (x, _example(other_shape))
        return {"onednn": (module, args), "gemm": (GemmConv1x1.of(module), args)}
    if isinstance(module, OneDnnLinear) and not module.binary and (module.activation == ""
                                                                   or module.activation in INPLACE_ACTIVATIONS):
        return {"onednn": (module, (x,)), "gemm": (GemmLinear(module, module.activation), (x,))}
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and len(shape) >= 2:
        rows = int(torch.Size(shape[:-1]).numel())
        packed = OneDnnLinear(module, "", rows)
        return {"eager": (module, (x,)), "onednn": (packed, (x,)), "gemm": (GemmLinear(module), (x,))}
    return None


def _signature(module: nn.Module, args: tuple) -> tuple:
    """Layers with equal signatures run the same kernels on the same shapes: one measurement serves them all."""
    post = (getattr(module, "binary", False), getattr(module, "activation", ""), getattr(module, "stride", None),
            getattr(module, "padding", None), module.bias is None)
    return type(module).__name__, tuple(module.weight.shape), tuple(tuple(a.shape) for a in args), str(post)


def choose_kernels(gm: fx.GraphModule, timer: timing.Timer | None = None) -> tuple[dict[str, int], list[str]]:
    """Swap each layer's module for its fastest alternative; ({kernel: layers}, one line per switched layer).
    ``timer`` (default ``seconds_per_call``) times one call of a ``functools.partial(module, *args)``."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    chosen: dict[str, int] = {}
    measured: dict[tuple, tuple[str, dict]] = {}
    switched = []
    with torch.inference_mode():
        layers = [n for n in gm.graph.nodes if n.op == "call_module" and calls[str(n.target)] == 1]
        for node in bar(layers, desc="timing cpu kernels", unit="layer"):
            options = _alternatives(gm, node)
            if options is None:
                continue
            current, args = options[next(iter(options))]
            key = _signature(current, args)
            if key not in measured:
                measured[key] = fastest({k: functools.partial(m, *a) for k, (m, a) in options.items()}, timer)
            name, seconds = measured[key]
            chosen[name] = chosen.get(name, 0) + 1
            if name != next(iter(options)):
                replace_submodule(gm, str(node.target), options[name][0])
                record_rewrite(node, "lower-cpu", node)
                times = ", ".join(f"{k} {t * 1e3:.3f} ms" for k, t in seconds.items())
                switched.append(f"  {node.target}: {times} -> {name}")
    return chosen, switched


@register_autotuner
def autotune_cpu_kernels(gm: fx.GraphModule, ctx: PassContext, timer: timing.Timer | None = None) -> bool:
    """lower-cpu's ``autotune`` step: notes for the report; True when some layer was switched."""
    chosen, switched = choose_kernels(gm, timer)
    if chosen:
        summary = ", ".join(f"{n} {k}" for k, n in sorted(chosen.items()))
        ctx.note(f"kernels chosen by timing ({torch.get_num_threads()} thread(s)): {summary}")
        for line in switched:
            ctx.note(line)
    return bool(switched)

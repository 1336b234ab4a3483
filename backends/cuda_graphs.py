"""cuda-runtime: run the lowered graph under an explicit TF32 policy, replaying a CUDA graph per input shape.

Rewrites the whole graph into one call of a ``CudaRuntime`` module that holds it:
    def forward(x): ...lowered body...   =>   def forward(x): return cuda_runtime(x)
Why: at small batch sizes a GPU model is bound by the CPU launching its kernels one by one; a CUDA graph
records the launches once and replays them with one call (torch.compile's "reduce-overhead" does the same).
Per call (``GraphCache``): the key is each tensor argument's shape, dtype and device (plain scalars by value);
a new key is warmed up on a side stream, then captured; every call copies its tensors into the key's static
inputs, replays, and returns clones of the static outputs; at most ``max_graphs`` keys are kept (least
recently used dropped). Other arguments (containers, objects) or a call inside another capture run eagerly;
CPU tensors given to a model on the GPU raise ``ConfigError`` (move them with ``.cuda()``); a capture that
fails turns capture off with one RuntimeWarning (the reason in ``capture_error``).
Why correct: a replay computes what the captured run computed on the values copied in, and outputs are copied
out before the next replay can overwrite them. Captured kernels read weights by address, so moving the module
(``.to()``) drops its graphs, and copies start empty. TF32 is set around each eager run and capture, then
restored. Concurrent calls are safe: a lock serializes the capture and the copy-in / replay / copy-out of the
shared static buffers (eager runs do not take it).
Options: ``capture``, ``max_graphs``, ``tf32`` (TF32 for fp32 convolutions and matmuls: only cuda-fp32 has any).
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from fxforge.errors import ConfigError
from fxforge.graph.meta import record_rewrite
from fxforge.numerics.precision import tf32_policy
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass

WARMUP_RUNS = 3  # the CUDA graph docs' example warms up 3 iterations on a side stream before capturing
_VALUE_TYPES = (int, float, bool, str, type(None))  # non-tensor arguments that may be part of a cache key

# capture(fn, static_args) -> (replay, static_outputs): records fn on static_args; replay() re-runs it in place
Capture = Callable[[Callable[..., Any], tuple[Any, ...]], tuple[Callable[[], None], Any]]


# ---------------------------------------------------------------------------------------------- capture
def capture_cuda_graph(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Callable[[], None], Any]:
    """Warm ``fn`` up on a side stream, then capture one run of it into a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*args)
    return graph.replay, outputs


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def cache_key(args: tuple[Any, ...], capturable: Callable[[torch.Tensor], bool] = _on_gpu) -> tuple | None:
    """(shape, dtype, device) per tensor and (type, value) per plain value; None when the call cannot replay
    a graph (a tensor that is not capturable, or an argument that is neither a tensor nor a plain value)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if not capturable(a):
                return None
            key.append((a.shape, a.dtype, a.device))
        elif isinstance(a, _VALUE_TYPES):  # hash() of a tuple holding tensors would be by identity: not a key
            key.append((type(a), a))
        else:
            return None
    return tuple(key)


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


@dataclass
class _Entry:
    inputs: list[torch.Tensor]  # the static input buffers, in argument order
    replay: Callable[[], None]
    outputs: Any  # the static outputs (the structure fn returns)


class GraphCache:
    """Captured graphs by cache key, least recently used first; see the module docstring for the protocol.

    ``capture`` and ``capturable`` are parameters so that the bookkeeping can be tested without a GPU.
    """

    def __init__(self, max_graphs: int = 8, capture: Capture = capture_cuda_graph,
                 capturable: Callable[[torch.Tensor], bool] = _on_gpu,
                 capturing: Callable[[], bool] = _capturing) -> None:
        self.max_graphs = max_graphs
        self.capture, self.capturable, self.capturing = capture, capturable, capturing
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.error: str | None = None  # why capture was turned off
        self.lock = threading.Lock()  # the static buffers are shared: one replay at a time

    def __call__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        key = None if self.error else cache_key(args, self.capturable)
        if key is None or self.capturing():
            return fn(*args)
        with self.lock:
            return self._replay(fn, args, key)

    def _replay(self, fn: Callable[..., Any], args: tuple[Any, ...], key: tuple) -> Any:
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(fn, args, key)
            if entry is None:
                return fn(*args)
        else:
            self.entries.move_to_end(key)
        for static, a in zip(entry.inputs, _tensors(args), strict=True):  # copy-in
            static.copy_(a)
        entry.replay()
        return tree_map(_clone, entry.outputs)

    def _capture(self, fn: Callable[..., Any], args: tuple[Any, ...], key: tuple) -> _Entry | None:
        static_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            replay, outputs = self.capture(fn, static_args)
        except Exception as exc:  # capture is an optimization: say why it is off and run eagerly
            self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            warnings.warn(f"fxforge cuda-runtime: CUDA graph capture failed ({self.error}); this module runs "
                          f"without capture from now on", RuntimeWarning, stacklevel=4)
            return None
        self.entries[key] = _Entry(_tensors(static_args), replay, outputs)
        while len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()

    @property
    def keys(self) -> list[tuple]:
        return list(self.entries)


def _tensors(args: tuple[Any, ...]) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


# ---------------------------------------------------------------------------------------------- runtime
def weights_on_gpu(module: nn.Module) -> bool:
    return any(t.is_cuda for t in module.parameters()) or any(t.is_cuda for t in module.buffers())


class CudaRuntime(nn.Module):
    """Runs ``graph_module`` under the TF32 policy, replaying a CUDA graph per input shape when ``capture``."""

    def __init__(self, graph_module: fx.GraphModule, capture: bool = True, max_graphs: int = 8,
                 tf32: bool = False) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.capture, self.max_graphs, self.tf32 = capture, max_graphs, tf32
        self.graphs = GraphCache(max_graphs)

    def forward(self, *args: Any) -> Any:
        try:
            with torch.inference_mode():
                return self.graphs(self.run_graph, args) if self.capture else self.run_graph(*args)
        except RuntimeError as exc:  # a device mismatch deep in a kernel: say which inputs and what to do
            cpu = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not a.is_cuda]
            if not cpu or not weights_on_gpu(self.graph_module):
                raise
            raise ConfigError(f"input(s) {', '.join(map(str, cpu))} are CPU tensors but this model runs on the GPU: "
                              f"move them with .cuda() (or .to(device)) before calling it") from exc

    def run_graph(self, *args: Any) -> Any:
        """One eager run under the TF32 policy. Captures go through here too, so the captured kernels are the
        ones the policy selects; replays launch them without it (setting the flags costs tens of microseconds
        of Python per call, as much as a small model's replay)."""
        with tf32_policy(self.tf32):
            return self.graph_module(*args)

    @property
    def capture_error(self) -> str | None:
        return self.graphs.error

    # Captured graphs read the weights by address and belong to one process: never copy or keep them stale.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["graphs"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.graphs = GraphCache(self.max_graphs)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): the weights move
        self.graphs.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"capture={self.capture}, max_graphs={self.max_graphs}, tf32={self.tf32}"


def wrap_in_runtime(gm: fx.GraphModule, runtime: nn.Module, name: str = "cuda_runtime") -> fx.GraphModule:
    """A new GraphModule whose forward passes its placeholders to ``runtime`` (which holds ``gm``)."""
    outer, placeholders = fx.Graph(), []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            default = node.args[0] if node.args else inspect.Signature.empty
            placeholders.append(outer.placeholder(node.target, default_value=default))
            placeholders[-1].meta = dict(node.meta)
    call = outer.call_module(name, tuple(placeholders))
    result = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    record_rewrite(call, "cuda-runtime", *([result] if isinstance(result, fx.Node) else []))
    outer.output(call)
    root = nn.Module()
    root.add_module(name, runtime)
    return fx.GraphModule(root, outer, class_name=type(gm).__name__).train(gm.training)


@register_pass
@dataclass(frozen=True)
class CudaRuntimePass(Pass):
    """The lowered graph -> one call of a CudaRuntime (TF32 policy, CUDA graph capture per input shape)."""

    name = "cuda-runtime"
    provides = frozenset({"cuda-runtime"})
    capture: bool = True
    max_graphs: int = 8
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs={self.max_graphs}: keep at least 1 graph (capture=false turns capture off)")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        wrapped = wrap_in_runtime(gm, CudaRuntime(gm, self.capture, self.max_graphs, self.tf32))
        capture = f"CUDA graph per input shape (at most {self.max_graphs})" if self.capture else "no graph capture"
        return PassResult(wrapped, True, [f"runtime: {capture}, TF32 {'on' if self.tf32 else 'off'}"])

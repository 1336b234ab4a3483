"""Graph snapshots: a plain-data copy of a graph's structure, kept per pass for reports and diffs.

A ``GraphSnapshot`` holds, per node, what a reader of the graph wants to see (op, module path, shape,
dtype, provenance from ``node.meta["fxforge"]``, the quantization plan's role) as strings and numbers: no
tensors, modules or fx nodes, so a snapshot costs a few kilobytes, stays valid while later passes rewrite the
graph in place, and pickles. The compiler records one after tracing and after every pass that changed the
graph (``CompileReport.stages``); ``fxforge.viz`` renders and diffs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .meta import KEY

# fxforge.quant.plan's keys (not imported from there: the quant package imports the passes)
_QPARAMS_KEY = "qparams_buffers"
_OBSERVER_KEY = "observer_group"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ was most of the snapshot's cost
class NodeRecord:
    """One node of a snapshot (treat it as read-only). ``inputs`` are the names of the nodes it reads."""

    name: str
    op: str  # placeholder, get_attr, call_module, call_function, call_method, output
    kind: str  # what it computes: the module class, function or method name ("Conv2d", "add", "quantized.conv2d")
    target: str
    inputs: tuple[str, ...] = ()
    module_path: str = ""  # the nn.Module it was traced in ("layer1.0.conv1"); "" at the root or not traced
    shape: tuple[int, ...] | None = None
    dtype: str | None = None  # "float32", "quint8", ...
    origins: tuple[str, ...] = ()  # traced nodes this one computes (record_rewrite); empty: just itself
    rewritten_by: str | None = None
    quant_role: str | None = None  # the int8 plan's role ("compute", "float", ...) where one was made
    reason: str = ""  # why the plan keeps this op in fp32
    detail: str = ""  # a module's post-ops, an observer's group, a scalar constant's value
    qparams: tuple[float, int] | None = None  # lowered int8 ops: scale and zero point of the output
    hint: str = ""  # node.meta["fxforge"]["role"] (a pass's word on how to show the node), or "observer"

    @property
    def provenance(self) -> tuple[str, ...]:
        """The traced nodes this node stands for (itself when no pass rewrote it)."""
        return self.origins or (self.name,)


@dataclass(frozen=True)
class GraphSnapshot:
    """The structure of a graph at one point of a compile."""

    nodes: tuple[NodeRecord, ...]
    title: str = ""
    modules: dict[str, str] = field(default_factory=dict)  # module path -> class name, from nn_module_stack

    def __len__(self) -> int:
        return len(self.nodes)

    def by_name(self) -> dict[str, NodeRecord]:
        return {n.name: n for n in self.nodes}


@dataclass(frozen=True)
class GraphStage:
    """The graph after ``after`` (a pass spec, or "trace" for the traced graph), the ``index``-th pass."""

    after: str
    index: int
    graph: GraphSnapshot = field(repr=False)


class _Lookup:
    """Module and scalar-constant lookups for one graph module, memoized per path (``get_submodule`` per node
    and ``named_modules`` per snapshot dominated the snapshot's cost)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._modules: dict[str, torch.nn.Module] = {"": gm}
        self._tensors: dict[str, torch.Tensor] | None = None

    def module(self, path: str) -> torch.nn.Module:
        found = self._modules.get(path)
        if found is None:
            parent, _, name = path.rpartition(".")
            found = self._modules[path] = self.module(parent)._modules[name]
        return found

    def scalar(self, target: str) -> torch.Tensor | None:
        if self._tensors is None:
            self._tensors = {**dict(self.gm.named_parameters()), **dict(self.gm.named_buffers())}
        value = self._tensors.get(target)
        return value if value is not None and value.numel() == 1 and not value.is_quantized else None


def _kind(look: _Lookup, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(look.module(str(node.target))).__name__
    if node.op == "call_function":
        if isinstance(node.target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
            return str(node.target).removesuffix(".default")  # "quantized.conv2d_relu"
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _module_path(node: fx.Node) -> str:
    """Where tracing found the node in the module hierarchy; "" for nodes passes inserted without one."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    if node.op == "call_module":
        return str(node.target)
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _detail(look: _Lookup, node: fx.Node) -> str:
    if node.op == "get_attr":
        value = look.scalar(str(node.target))
        return "" if value is None else f"{value.item():.4g}"
    if node.op != "call_module":
        return ""
    mod = look.module(str(node.target))
    # class-level lookups: a missing attribute on an nn.Module goes through its slow __getattr__
    post_ops = getattr(mod, "post_ops", None) if isinstance(getattr(type(mod), "post_ops", None), property) \
        else mod.__dict__.get("post_ops")
    if isinstance(post_ops, str) and post_ops:
        return f"post-ops {post_ops}"
    activation = mod.__dict__.get("activation")
    return f"post-ops {activation}" if isinstance(activation, str) and activation else ""


def _qparams(look: _Lookup, meta: dict) -> tuple[float, int] | None:
    names = meta.get(_QPARAMS_KEY)
    if not names:
        return None
    scale, zero_point = (look.scalar(str(n)) for n in names)
    return None if scale is None or zero_point is None else (float(scale.item()), int(zero_point.item()))


def _hint(meta: dict) -> str:
    if meta.get("role"):
        return str(meta["role"])
    return "observer" if _OBSERVER_KEY in meta else ""


def _record(look: _Lookup, node: fx.Node) -> NodeRecord:
    meta = node.meta.get(KEY) or {}
    plan = meta.get("quant") or {}
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    dtype = getattr(tm, "dtype", None)
    return NodeRecord(
        name=node.name, op=node.op, kind=_kind(look, node), target=str(node.target),
        inputs=tuple(n.name for n in node.all_input_nodes), module_path=_module_path(node),
        shape=None if shape is None else tuple(shape),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        origins=tuple(meta.get("origins", ())), rewritten_by=meta.get("rewritten_by"),
        quant_role=plan.get("role"), reason=plan.get("reason", ""), detail=_detail(look, node),
        qparams=_qparams(look, meta), hint=_hint(meta),
    )


def snapshot(gm: fx.GraphModule, title: str = "") -> GraphSnapshot:
    """A plain-data copy of ``gm``'s graph (see the module docstring)."""
    look = _Lookup(gm)
    modules: dict[str, str] = {}
    for node in gm.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            # (path, class or its qualified name)
            if isinstance(entry, tuple) and len(entry) == 2 and entry[0] not in modules:
                modules[entry[0]] = getattr(entry[1], "__name__", str(entry[1]).rsplit(".", 1)[-1])
    return GraphSnapshot(tuple(_record(look, n) for n in gm.graph.nodes), title, modules)

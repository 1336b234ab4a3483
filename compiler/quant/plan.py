"""Quantization planning: which values are quantized, which share qparams, and where observers go.

Roles come from the op table (``fxforge.quant.ops``). Planning then decides, per value (node output):
- *root*: a quantized value computed in fp32 (a compute op's output, a model input, or an fp32 island's
  output that quantized ops consume): an observer watches it and insert-qdq puts a ``quantize`` there;
- *derived*: a direct op (flatten, max-pool, relu, cat, ...) on a quantized value: it runs on the quantized
  tensor and keeps its qparams, needing neither observer nor quantize;
- *requant*: a share op's output (average pooling), quantized again with its input's qparams.
A relu/relu6 that is the sole user of a compute op is *absorbed*: the quantization point moves after it
(``dq -> conv -> relu -> q``), so the negative half does not waste int8 levels. Values that must carry
identical qparams (cat inputs and output, shape ops' inputs and outputs) form one group (union-find). A value
that an in-place op changes where other readers can see it stays fp32, with every value aliasing it.
The plan is stored per node in ``node.meta["fxforge"]["quant"]`` for insert-qdq and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from fxforge.graph.matching import is_in_place, mutates_only_private_value
from fxforge.graph.meta import fxmeta

from .config import LayerQuant, QuantOptions, layer_name
from .ops import CAT, COMPUTE, DIRECT, FLOAT, META, SHARE, OpInfo, op_info

ABSORBED = "absorbed"
OBSERVER_KEY = "observer_group"  # fxmeta key on observer nodes: the qparam group they watch
QPARAMS_KEY = "qparams_buffers"  # fxmeta key on lowered int8 calls: (scale, zero point) buffers of their output
_ABSORBABLE = {"relu", "relu6", "hardtanh", "clamp"}


def is_float_tensor(node: fx.Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return isinstance(node, fx.Node) and getattr(tm, "dtype", None) in (torch.float32, torch.float16,
                                                                         torch.bfloat16)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads (flattening the list argument of cat)."""
    return [a for a in node.all_input_nodes if "tensor_meta" in a.meta]


@dataclass
class NodePlan:
    """What insert-qdq does with one node."""

    role: str
    kind: str
    layer: str
    reason: str = ""  # why an op stays fp32 (report)
    state: str | None = None  # "root", "derived" or "requant" when the node's output is quantized
    group: int | None = None
    op_type: type | None = None

    def as_meta(self) -> dict:
        return dict(self.__dict__)


@dataclass
class QuantPlan:
    nodes: dict[fx.Node, NodePlan]
    group_of: dict[fx.Node, int] = field(default_factory=dict)
    group_config: dict[int, tuple[str, LayerQuant]] = field(default_factory=dict)  # gid -> (layer, config)


def _effective(gm: fx.GraphModule, node: fx.Node, opts: QuantOptions) -> NodePlan:
    info: OpInfo = op_info(gm, node)
    plan = NodePlan(info.role, info.kind, layer_name(node), op_type=info.op_type)
    if node.op in ("placeholder", "get_attr", "output"):
        plan.role = FLOAT
    elif plan.role != FLOAT and opts.skipped(plan.layer):
        plan.role, plan.reason = FLOAT, "skipped"
    elif plan.role in (COMPUTE, SHARE, CAT) and not _operands_quantizable(node):
        plan.role, plan.reason = FLOAT, "an operand is a constant or not a float tensor"
    elif plan.role == DIRECT and (len(tensor_inputs(node)) != 1 or not is_float_tensor(node)):
        plan.role = FLOAT  # e.g. slicing with a tensor index: nothing to keep quantized
    elif plan.role == FLOAT:
        plan.reason = "no int8 implementation"
    return plan


def _operands_quantizable(node: fx.Node) -> bool:
    inputs = tensor_inputs(node)
    return bool(inputs) and is_float_tensor(node) and all(
        is_float_tensor(a) and a.op != "get_attr" for a in inputs)


class _Groups:
    """Union-find over group ids."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        self.parent[max(a, b)] = min(a, b)
        return min(a, b)


def _changed_in_place(gm: fx.GraphModule, plans: dict[fx.Node, NodePlan]) -> set[fx.Node]:
    """Values an in-place op changes visibly, and the values aliasing them through direct ops (views)."""
    def aliases(n: fx.Node) -> bool:
        return plans[n].role == DIRECT or is_in_place(gm, n)

    todo = [n.args[0] for n in gm.graph.nodes
            if is_in_place(gm, n) and n.args and not mutates_only_private_value(gm, n)]
    found: set[fx.Node] = set()
    while todo:
        node = todo.pop()
        if not isinstance(node, fx.Node) or node in found:
            continue
        found.add(node)
        todo.extend(u for u in node.users if aliases(u) and u.args and u.args[0] is node)
        todo.extend(node.args[:1] if aliases(node) else ())
    return found


def _keep_fp32(plans: dict[fx.Node, NodePlan], values: set[fx.Node]) -> None:
    """``values`` stay fp32: their ops run in fp32, and so does a cat that would need them quantized."""
    for node, plan in plans.items():
        if plan.role != FLOAT and (node in values or (plan.role == CAT and values & set(tensor_inputs(node)))):
            plan.role, plan.reason = FLOAT, "a value changed in place"


def _absorb_activations(gm: fx.GraphModule, plans: dict[fx.Node, NodePlan]) -> None:
    """compute -> relu-like (sole user) : the relu joins the compute op, quantized after it."""
    for node, plan in plans.items():
        user = next(iter(node.users)) if len(node.users) == 1 else None
        if plan.role == COMPUTE and user is not None and plans[user].role == DIRECT \
                and plans[user].kind in _ABSORBABLE:
            plans[user].role = ABSORBED


def _required(plans: dict[fx.Node, NodePlan]) -> set[fx.Node]:
    """Values that must be quantized: quantized ops' inputs and compute ops' outputs."""
    required: set[fx.Node] = set()
    for node, plan in plans.items():
        if plan.role in (COMPUTE, SHARE, CAT):
            required.update(tensor_inputs(node))
        if plan.role == COMPUTE and not any(plans[u].role == ABSORBED for u in node.users):
            required.add(node)
        if plan.role == ABSORBED:
            required.add(node)
    return required


def plan_quantization(gm: fx.GraphModule, opts: QuantOptions) -> QuantPlan:
    """Decide roles, quantized values and qparam groups for every node (see the module docstring)."""
    plans = {n: _effective(gm, n, opts) for n in gm.graph.nodes}
    changed = _changed_in_place(gm, plans)
    _keep_fp32(plans, changed)
    _absorb_activations(gm, plans)
    required = _required(plans) - changed
    groups, group_of = _Groups(), {}
    for node in gm.graph.nodes:
        plan = plans[node]
        source = tensor_inputs(node)[0] if plan.role in (DIRECT, SHARE) else None
        if plan.role in (DIRECT, SHARE) and source in group_of:
            plan.state = "derived" if plan.role == DIRECT else "requant"
            group_of[node] = group_of[source]
        elif plan.role == CAT:
            plan.state = "derived"
            group_of[node] = _union_all(groups, [group_of[a] for a in tensor_inputs(node)])
        elif node in required:
            plan.state = "root"
            group_of[node] = groups.new()
        if plan.role in (SHARE,) and plan.state is None:
            plan.role, plan.reason = FLOAT, "input is not quantized"
    for node, gid in group_of.items():
        plans[node].group = groups.find(gid)
    return QuantPlan(plans, {n: p.group for n, p in plans.items() if p.group is not None})


def _union_all(groups: _Groups, gids: list[int]) -> int:
    root = gids[0]
    for gid in gids[1:]:
        root = groups.union(root, gid)
    return root


def config_layer(node: fx.Node, plans: dict[fx.Node, NodePlan]) -> NodePlan:
    """The plan whose layer config chooses the observer of root value ``node``: the op that computed it,
    or (for a model input or an fp32 island's output) the first quantized op that reads it."""
    if plans[node].role in (COMPUTE, ABSORBED):
        return plans[node.args[0]] if plans[node].role == ABSORBED else plans[node]
    readers = [plans[u] for u in node.users if plans[u].role in (COMPUTE, SHARE, CAT, DIRECT)]
    return readers[0] if readers else plans[node]


def group_buffers(gid: int) -> tuple[str, str]:
    """Names of a qparam group's scale / zero-point buffers on the graph module."""
    return f"act_{gid}_scale", f"act_{gid}_zero_point"


def observer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if OBSERVER_KEY in fxmeta(n)]


def store(plan: QuantPlan) -> None:
    for node, p in plan.nodes.items():
        fxmeta(node)["quant"] = p.as_meta()


def stored(node: fx.Node) -> dict:
    return fxmeta(node).get("quant", {})


__all__ = [
    "ABSORBED", "CAT", "COMPUTE", "DIRECT", "FLOAT", "META", "OBSERVER_KEY", "QPARAMS_KEY", "SHARE", "NodePlan",
    "QuantPlan",
    "config_layer", "group_buffers", "is_float_tensor", "observer_nodes", "plan_quantization", "store", "stored",
    "tensor_inputs",
]

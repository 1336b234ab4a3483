"""to-nhwc{outputs=eager}: run conv-heavy regions channels-last, converting once at their boundaries.

Rewrites (every new node is an explicit layout conversion, shown as such in reports and viz):
    x (4-D, made outside a region, read inside)  =>  x.contiguous(memory_format=torch.channels_last)  "enter"
    v (region value read by a view / flatten / reshape / linear head / unknown op / the graph output)
                                                 =>  v.contiguous()                                   "exit"
    cat / interpolate / pad inside a region      =>  output re-asserted channels-last              "reassert"
A region is a weakly connected set of 4-D floating ops known to keep the layout (convs, BatchNorm,
activations, pooling, elementwise arithmetic, cat, interpolate, pad, keepdim reductions) holding a Conv2d.
Why correct: those ops compute the same values in either layout; layout is observable only through
``.view``, strides, aliasing and the outputs. Readers outside a region get NCHW-contiguous values, outputs
get eager's layout (``outputs=channels_last`` leaves region outputs channels-last), values that may share
memory with one mutated in place keep eager's layout, and values contiguous in both layouts at the example's
shape are restrided with ``x.to(memory_format=...)``. Idempotent. docs/targets.md (*Layout: to-nhwc*) has
the details. Preconditions: shapes propagated; after fusion, before lowering.

Before: ``y = fc(flatten(avgpool(relu(conv2(relu(conv1(x)))))))``
After:  ``y = fc(flatten(avgpool(relu(conv2(relu(conv1(x.contiguous(memory_format=channels_last))))))))``
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn

from fxforge.graph.fused import FusedConv
from fxforge.graph.matching import is_in_place
from fxforge.graph.meta import fxmeta, record_rewrite, tensor_info
from fxforge.graph.ops import module_op, op_name
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.verify import invariant

CL = torch.channels_last
OUTPUTS = ("eager", "channels_last")
KINDS = ("enter", "exit", "reassert")  # fxmeta(node)["nhwc"] of the conversions this pass writes

# ops that return channels-last when their 4-D inputs are channels-last
_KEEP = frozenset({"conv2d", "conv_transpose2d", "batch_norm", "relu", "relu6", "hardtanh", "hardswish", "hardsigmoid",
                   "silu", "sigmoid", "tanh", "gelu", "leaky_relu", "elu", "max_pool2d", "avg_pool2d",
                   "adaptive_avg_pool2d", "adaptive_max_pool2d", "add", "mul", "sub", "div", "clamp", "mean"})
# ops that compute the same values in any layout but may return another one: re-asserted
_DROP = frozenset({"cat", "interpolate", "pad"})
# consumers outside a region that read a value's numbers without caring for its strides: no exit before them
_INSENSITIVE = frozenset({"mean", "sum", "amax", "amin", "getattr", "numel", "size", "dim"})
# pooling whose output is 1x1 whatever the input size when asked for that output size
_GLOBAL_POOLS = frozenset({"adaptive_avg_pool2d", "adaptive_max_pool2d"})
# reductions that are a global pooling over the last two dims with keepdim=True
_REDUCTIONS = frozenset({"mean", "amax", "sum"})


# ---------------------------------------------------------------------------------------------- node kinds
@dataclass(frozen=True)
class _Graph:
    """The graph module and its submodules by path (``get_submodule`` walks the path on every call: with
    ~1000 look-ups per model that was most of this pass's time)."""

    gm: fx.GraphModule
    modules: dict[str, nn.Module]

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def op(self, node: fx.Node) -> str | None:
        """The op-table name of what ``node`` computes, else None."""
        return op_name(node, self.module)

    def in_place(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return bool(getattr(self.module(node), "inplace", False)) or node.kwargs.get("inplace", False)
        return is_in_place(self.gm, node)

def is_to_channels_last(node: fx.Node) -> bool:
    """``x.contiguous(memory_format=torch.channels_last)`` or ``x.to(memory_format=torch.channels_last)``:
    a conversion into channels-last."""
    return (node.op == "call_method" and node.target in ("contiguous", "to") and len(node.args) == 1
            and node.kwargs == {"memory_format": CL})


def is_to_contiguous(node: fx.Node) -> bool:
    """``x.contiguous()`` or ``x.to(memory_format=torch.contiguous_format)``: a conversion into NCHW."""
    if node.op != "call_method" or len(node.args) != 1:
        return False
    if node.target == "to":
        return node.kwargs == {"memory_format": torch.contiguous_format}
    return node.target == "contiguous" and node.kwargs.get("memory_format", torch.contiguous_format) is \
        torch.contiguous_format


def _is_4d_float(node: object) -> bool:
    info = tensor_info(node) if isinstance(node, fx.Node) else None
    shape = getattr(info, "shape", None)
    return shape is not None and len(shape) == 4 and info.dtype.is_floating_point


def _keeps(g: _Graph, node: fx.Node) -> bool:
    return g.op(node) in _KEEP or isinstance(g.module(node), FusedConv)


def _drops(g: _Graph, node: fx.Node) -> bool:
    return g.op(node) in _DROP


def _layout_free(g: _Graph, node: fx.Node) -> bool:
    """An op that may join a region: known to compute the same 4-D values in either layout, not in place."""
    if not _is_4d_float(node) or g.in_place(node):
        return False
    return is_to_channels_last(node) or _keeps(g, node) or _drops(g, node)


def _is_conv2d(g: _Graph, node: fx.Node) -> bool:
    mod = g.module(node)
    if isinstance(mod, FusedConv):
        return module_op(mod.conv) == "conv2d"
    return g.op(node) == "conv2d"


def _is_global_pool(g: _Graph, node: fx.Node) -> bool:
    """A pooling/reduction whose output is 1x1 whatever the input size."""
    op, mod = g.op(node), g.module(node)
    if op in _GLOBAL_POOLS and mod is not None:
        return mod.output_size in (1, (1, 1), [1, 1])
    if op in _GLOBAL_POOLS:
        return node.args[1:2] in ((1,), ((1, 1),), ([1, 1],)) or node.kwargs.get("output_size") in (1, (1, 1))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2])
    return op in _REDUCTIONS and mod is None and keep is True and isinstance(dims, (tuple, list)) \
        and {d % 4 for d in dims} == {2, 3}


def _ambiguous_here(node: fx.Node) -> bool:
    """Contiguous in both layouts at the example's shape (one channel or 1x1 maps): ``contiguous(fmt)`` then
    returns it as it is, with strides on which torch may still read the other layout (a conv would return that
    one), while ``to(memory_format=fmt)`` restrides it. Elsewhere both do the same: the plain spelling is used."""
    shape = tensor_info(node).shape
    return shape[1] == 1 or shape[2] * shape[3] == 1


def _single_channel(node: fx.Node) -> bool:
    """One channel: ``contiguous()`` is then a no-op on either layout, and ``contiguous(channels_last)`` one on
    NCHW strides, which torch still reads as NCHW (a conv would return NCHW): ``.to(channels_last)`` restrides."""
    return tensor_info(node).shape[1] == 1


def _contiguous_anyway(g: _Graph, node: fx.Node) -> bool:
    """NCHW-contiguous in either layout (``contiguous()`` returns it as it is, ``.view`` works on it): one
    channel, or the 1x1 output of a global pooling."""
    return _single_channel(node) or _is_global_pool(g, node)


def _is_fresh(g: _Graph, node: fx.Node) -> bool:
    """Returns a new tensor (no view of an input): the region ops, except conversions (which may not copy)."""
    return _layout_free(g, node) and not is_to_channels_last(node)


# ---------------------------------------------------------------------------------------------- analysis
def mutated_values(g: _Graph) -> set[fx.Node]:
    """Values that an in-place op mutates or that may share memory with one (conservatively: every op not
    known to return a fresh tensor may return a view of any input)."""
    in_place = [n for n in g.gm.graph.nodes if n.op != "output" and g.in_place(n)]
    if not in_place:
        return set()
    aliases = nx.Graph()
    for node in g.gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr", "output") and not _is_fresh(g, node):
            aliases.add_edges_from((node, source) for source in node.all_input_nodes)
    mutated: set[fx.Node] = set()
    for node in in_place:
        if node not in mutated:
            mutated |= nx.node_connected_component(aliases, node) if node in aliases else {node}
    return mutated


def regions(g: _Graph, excluded: set[fx.Node] = frozenset()) -> list[set[fx.Node]]:
    """The channels-last regions: weakly connected sets of layout-free 4-D ops holding at least one Conv2d,
    in graph order. The view is ``fxforge.viz.to_networkx``'s, keyed by node (importing viz costs ~0.2 s)."""
    view = nx.DiGraph()
    for node in g.gm.graph.nodes:
        if node not in excluded and _layout_free(g, node):
            view.add_node(node)
            view.add_edges_from((source, node) for source in node.all_input_nodes if source in view)
    found = [region for region in map(set, nx.weakly_connected_components(view))
             if any(_is_conv2d(g, n) for n in region)]
    order = {n: i for i, n in enumerate(g.gm.graph.nodes)}
    return sorted(found, key=lambda region: min(map(order.__getitem__, region)))


# ---------------------------------------------------------------------------------------------- rewriting
def _conversion(g: _Graph, value: fx.Node, kind: str, where: fx.Node, before: bool) -> fx.Node:
    """``value.contiguous(...)`` inserted before/after ``where``, with provenance and its layout recorded."""
    method = "to" if _ambiguous_here(value) else "contiguous"
    fmt = torch.contiguous_format if kind == "exit" else CL
    kwargs = {} if method == "contiguous" and kind == "exit" else {"memory_format": fmt}
    with g.gm.graph.inserting_before(where) if before else g.gm.graph.inserting_after(where):
        new = g.gm.graph.call_method(method, (value,), kwargs)
    record_rewrite(new, "to-nhwc", value)  # with eager's shape metadata (its layout decides the outputs')
    meta = fxmeta(new)
    meta.update(role="layout", nhwc=kind, layout="contiguous" if kind == "exit" else "channels_last")
    return new


def _reassert(g: _Graph, node: fx.Node, region: set[fx.Node]) -> bool:
    """Re-assert channels-last after ``node`` when it may have dropped it; True when a node was added."""
    constant_input = any(a.op == "get_attr" and _is_4d_float(a) and not _is_global_pool(g, a)
                         for a in node.all_input_nodes)
    # a single-channel result of anything but a conv may come back NCHW-strided (x.mean(1, keepdim=True) does)
    may_drop = _drops(g, node) or constant_input or (_single_channel(node) and not _is_conv2d(g, node))
    if not may_drop or is_to_channels_last(node) or _is_global_pool(g, node):
        return False
    if node.users and all(is_to_channels_last(u) for u in node.users):
        return False  # asserted already (a second run)
    new = _conversion(g, node, "reassert", node, before=False)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    region.add(new)
    return True


def _needs_entry(g: _Graph, value: fx.Node, region: set[fx.Node]) -> bool:
    """A 4-D value from outside the region that is not channels-last already (constants stay as they are:
    converting one would copy it on every call; the ops reading them are re-asserted instead)."""
    return (value not in region and value.op != "get_attr" and _is_4d_float(value)
            and not is_to_channels_last(value) and not _is_global_pool(g, value))


def _enter(g: _Graph, value: fx.Node, readers: list[fx.Node], mutated: set[fx.Node], region: set[fx.Node],
           entered: dict[fx.Node, fx.Node]) -> int:
    """Convert ``value`` for its ``readers`` in the region: once, after it (shared with the other regions
    that read it: ``entered``), or (when it may be mutated) per reader, right before it reads. Returns the
    number of conversions added."""
    if value in mutated:
        for reader in readers:
            region.add(new := _conversion(g, value, "enter", reader, before=True))
            reader.replace_input_with(value, new)
        return len(readers)
    added = value not in entered
    if added:
        last_placeholder = [n for n in g.gm.graph.nodes if n.op == "placeholder"][-1]
        where = last_placeholder if value.op == "placeholder" else value
        entered[value] = _conversion(g, value, "enter", where, before=False)
    region.add(entered[value])
    for reader in readers:
        reader.replace_input_with(value, entered[value])
    return int(added)


def _insensitive(node: fx.Node) -> bool:
    """A consumer that reads a value without depending on its strides (conversions included)."""
    return (is_to_channels_last(node) or is_to_contiguous(node)
            or (node.op != "call_module" and op_name(node) in _INSENSITIVE))


def _exit_readers(value: fx.Node, region: set[fx.Node], outputs: str) -> list[fx.Node]:
    """The readers of region value ``value`` that need it NCHW-contiguous, in graph order."""
    readers = []
    for user in value.users:
        if user in region or _insensitive(user):
            continue
        if user.op == "output":
            eager = getattr(value.meta.get("tensor_meta"), "memory_format", None)
            if outputs == "channels_last" or eager is not torch.contiguous_format:
                continue
        readers.append(user)
    if len(readers) < 2:
        return readers
    order = {n: i for i, n in enumerate(value.graph.nodes)}
    return sorted(readers, key=order.__getitem__)


def _exit(g: _Graph, value: fx.Node, region: set[fx.Node], outputs: str) -> int:
    readers = _exit_readers(value, region, outputs)
    if _contiguous_anyway(g, value):  # its strides may still read as channels-last: only readers making 4-D
        readers = [r for r in readers if r.op != "output" and _is_4d_float(r)]  # tensors of it pass that on
    if not readers:
        return 0
    new = _conversion(g, value, "exit", readers[0], before=True)  # one copy, taken when it is first needed
    for reader in readers:
        reader.replace_input_with(value, new)
    return 1


def _exit_at_once(g: _Graph, node: fx.Node, mutated: set[fx.Node]) -> int:
    """A region op whose value may be mutated in place: every reader reads one NCHW copy made right after it
    (the copy is then the tensor eager had, aliases and mutations included)."""
    if all(is_to_contiguous(u) for u in node.users):
        return 0  # done already (a second run), or nothing reads it
    new = _conversion(g, node, "exit", node, before=False)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    mutated.add(new)  # region ops reading it get their own conversion, right before they read
    return 1


def _in_order(g: _Graph, nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` in graph order: rewrites in a deterministic order give the same graph (and names) each time."""
    return [n for n in g.gm.graph.nodes if n in nodes]


def _rewrite_region(g: _Graph, region: set[fx.Node], mutated: set[fx.Node], outputs: str,
                    entered: dict[fx.Node, fx.Node]) -> Counter:
    counts: Counter = Counter()
    for node in _in_order(g, region & mutated):
        counts["exit"] += _exit_at_once(g, node, mutated)
    for node in _in_order(g, region):
        counts["reassert"] += _reassert(g, node, region)
    entries: dict[fx.Node, list[fx.Node]] = {}
    for node in _in_order(g, region):
        for value in node.all_input_nodes if not is_to_channels_last(node) else ():
            if _needs_entry(g, value, region):
                entries.setdefault(value, []).append(node)
    for value, readers in entries.items():
        counts["enter"] += _enter(g, value, readers, mutated, region, entered)
    for node in _in_order(g, region):
        counts["exit"] += _exit(g, node, region, outputs)
    for node in region:
        fxmeta(node)["layout"] = "channels_last"
    return counts


def conversions(gm: fx.GraphModule) -> Counter:
    """How many layout conversions of each kind (enter / exit / reassert) to-nhwc left in ``gm``."""
    return Counter(fxmeta(n)["nhwc"] for n in gm.graph.nodes if fxmeta(n).get("nhwc") in KINDS)


@register_pass
@dataclass(frozen=True)
class ToNhwc(Pass):
    """Conv-heavy 4-D regions -> channels-last, with explicit conversions at their boundaries."""

    name = "to-nhwc"
    provides = frozenset({"nhwc"})
    outputs: str = "eager"  # or "channels_last": region values returned as they are

    def __post_init__(self) -> None:
        if self.outputs not in OUTPUTS:
            raise ValueError(f"outputs={self.outputs!r}: choose one of {', '.join(OUTPUTS)}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.shapes(gm)
        g = _Graph(gm, dict(gm.named_modules()))
        mutated = mutated_values(g)
        found = regions(g, {n for n in mutated if not _is_fresh(g, n)})  # fresh ones exit at once
        # one membership set: a value entered once serves every region reading it, and a reader in another
        # region needs no conversion
        counts = _rewrite_region(g, set().union(*found), mutated, self.outputs, {})
        convs = sum(_is_conv2d(g, n) for region in found for n in region)
        notes = [f"{len(found)} channels-last region(s) holding {convs} conv(s): {counts['enter']} conversion(s) "
                 f"in, {counts['exit']} out, {counts['reassert']} re-assertion(s)"]
        if mutated:
            notes.append(f"{len(mutated)} value(s) kept in eager layout: they may share memory with a value "
                         f"mutated in place")
        return PassResult(gm, sum(counts.values()) > 0, notes)


@invariant("nhwc")
def _no_view_of_channels_last(gm: fx.GraphModule) -> str | None:
    """``.view`` fails on channels-last strides: no view may read a value planned channels-last (unless it is
    NCHW-contiguous too)."""
    g = _Graph(gm, dict(gm.named_modules()))
    bad = [n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"
           and isinstance(n.args[0], fx.Node) and fxmeta(n.args[0]).get("layout") == "channels_last"
           and not _contiguous_anyway(g, n.args[0])]
    return f"view of a channels-last value: {', '.join(bad)}" if bad else None

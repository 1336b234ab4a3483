"""Snapshot -> Graphviz digraph: labels, clusters by module hierarchy, collapsed repeated blocks, a legend.

A ``View`` is what gets drawn: nodes (a snapshot record, its role, a diff status) and edges. ``digraph``
turns it into a ``graphviz.Digraph``:
- one box per node, styled by role (``fxforge.viz.roles``), labelled with the op, its module path, shape and
  dtype, the traced ops a fused node stands for, qparams where known and why an op stayed fp32;
- nodes grouped in nested clusters by the module they were traced in (``layer1`` > ``layer1.0``);
- in large graphs (over ``AUTO_COLLAPSE_NODES`` drawn nodes, or ``collapse=True``), runs of sibling modules
  with the same ops and wiring (``layer3.1`` ... ``layer3.5``) drawn once, the rest as one box;
- constants (``get_attr``: weights, qparams) hidden unless ``constants=True``; their scalar values appear
  on the quantize nodes that read them.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import graphviz

from fxforge.graph.snapshot import GraphSnapshot, NodeRecord

from .roles import ROLES, STATUSES, node_style, role_of

AUTO_COLLAPSE_NODES = 150
_COLLAPSED = "__fxforge_collapsed_"


@dataclass
class ViewNode:
    rec: NodeRecord
    role: str
    status: str | None = None  # diff status; None when drawing a single graph
    note: str = ""  # an extra label line ("folded into conv1")


@dataclass
class View:
    nodes: list[ViewNode]
    edges: list[tuple[str, str, dict[str, str]]]
    title: str = ""
    modules: dict[str, str] = field(default_factory=dict)  # module path -> class name
    beside: dict[str, str] = field(default_factory=dict)  # node -> node to draw it level with (diffs: old, new)


def view_of(snap: GraphSnapshot, title: str | None = None) -> View:
    nodes = [ViewNode(r, role_of(r)) for r in snap.nodes]
    edges = [(i, r.name, {}) for r in snap.nodes for i in r.inputs]
    return View(nodes, edges, snap.title if title is None else title, snap.modules)


# ---- labels ---------------------------------------------------------------------------------------------

def _esc(text: str) -> str:
    """Backslashes escaped (DOT reads ``\\n`` as a line break)."""
    return text.replace("\\", "\\\\")


def _plain(*lines: str) -> str:
    """A DOT string of ``lines``, never read as an HTML-like label (``<<b ... x>`` would be one, and ``dot``
    fails on it): names of users' modules and classes can hold any character."""
    return graphviz.nohtml("\\n".join(_esc(line) for line in lines if line))


def _shape_text(rec: NodeRecord) -> str:
    if rec.shape is None:
        return ""
    dims = "x".join(map(str, rec.shape)) or "scalar"
    # a lowered int8 kernel keeps the fp32 op's shape metadata, but its output is quantized (it has qparams)
    dtype = "quantized" if rec.qparams is not None else rec.dtype
    return f"{dims} {dtype}" if dtype else dims


def _origins_text(origins: tuple[str, ...], most: int = 4) -> str:
    shown = " + ".join(origins[:most])
    return "= " + shown + (f" + {len(origins) - most} more" if len(origins) > most else "")


def _qparams_text(vn: ViewNode, constants: dict[str, str]) -> str:
    rec = vn.rec
    if rec.qparams is not None:
        return f"out scale {rec.qparams[0]:.4g} zp {rec.qparams[1]}"
    values = [constants[i] for i in rec.inputs if i in constants]
    return f"scale {values[0]} zp {values[1]}" if vn.role == "quantize" and len(values) >= 2 else ""


def label(vn: ViewNode, constants: dict[str, str]) -> str:
    rec = vn.rec
    head = rec.name if rec.op in ("placeholder", "get_attr", "output") else rec.kind
    lines = [head + (f" ({rec.detail})" if rec.detail and rec.op != "get_attr" else "")]
    if rec.op == "get_attr" and rec.detail:
        lines.append(f"= {rec.detail}")
    where = rec.target if rec.op == "call_module" else rec.module_path
    if where and where != head:
        lines.append(where)
    lines.append(_shape_text(rec))
    if len(rec.origins) > 1:
        lines.append(_origins_text(rec.origins))
    lines.append(_qparams_text(vn, constants))
    if vn.role == "fp32-island":
        lines.append(f"fp32: {rec.reason}")
    lines.append(vn.note)
    return _plain(*lines)


def tooltip(vn: ViewNode) -> str:
    rec = vn.rec
    parts = [f"{rec.name}: {rec.op} {rec.target}", f"role: {vn.role}"]
    if rec.origins:
        parts.append(f"computes traced: {', '.join(rec.origins)}")
    if rec.rewritten_by:
        parts.append(f"rewritten by {rec.rewritten_by}")
    if rec.reason:
        parts.append(f"fp32 because: {rec.reason}")
    return _plain("; ".join(parts))


# ---- clusters -----------------------------------------------------------------------------------------

@dataclass
class _Cluster:
    path: str
    nodes: list[str] = field(default_factory=list)  # drawn directly in this cluster
    children: list[_Cluster] = field(default_factory=list)


def _containers(nodes: list[ViewNode]) -> set[str]:
    """Module paths that contain other modules seen in the graph."""
    out: set[str] = set()
    for vn in nodes:
        parts = vn.rec.module_path.split(".") if vn.rec.module_path else []
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _placed_paths(nodes: list[ViewNode], inputs: dict[str, list[str]]) -> dict[str, str]:
    """Module paths, where nodes that passes inserted without one (quantize, observers) take their first
    input's: a quantize belongs with the value it quantizes."""
    placed: dict[str, str] = {}
    for vn in nodes:
        path = vn.rec.module_path
        if not path and vn.rec.op not in ("placeholder", "output"):
            path = next((placed[i] for i in inputs.get(vn.rec.name, ()) if placed.get(i)), "")
        placed[vn.rec.name] = path
    return placed


def _cluster_of(vn: ViewNode, path: str, containers: set[str]) -> str:
    """A module's own op goes in its parent's cluster; ops of a container module (an add in a block) in its."""
    if path == vn.rec.module_path and vn.rec.op == "call_module" or path not in containers:
        path = path.rpartition(".")[0]
    return path


def _tree(nodes: list[ViewNode], inputs: dict[str, list[str]]) -> _Cluster:
    root = _Cluster("")
    by_path: dict[str, _Cluster] = {"": root}
    containers = _containers(nodes)
    placed = _placed_paths(nodes, inputs)
    for vn in nodes:
        path, parent = _cluster_of(vn, placed[vn.rec.name], containers), root
        parts = path.split(".") if path else []
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in by_path:
                by_path[sub] = _Cluster(sub)
                parent.children.append(by_path[sub])
            parent = by_path[sub]
        parent.nodes.append(vn.rec.name)
    _flatten_single_nodes(root)
    return root


def _flatten_single_nodes(cluster: _Cluster) -> None:
    """A cluster around one node says nothing the label does not: draw the node in the parent."""
    kept = []
    for child in cluster.children:
        _flatten_single_nodes(child)
        if not child.children and len(child.nodes) == 1:
            cluster.nodes.extend(child.nodes)
        else:
            kept.append(child)
    cluster.children = kept


def _members(cluster: _Cluster) -> list[str]:
    return cluster.nodes + [n for c in cluster.children for n in _members(c)]


# ---- collapsing repeated blocks -------------------------------------------------------------------------

@dataclass
class _Collapse:
    boxes: dict[str, tuple[str, list[_Cluster]]] = field(default_factory=dict)  # box id -> (first block, repeats)
    mapping: dict[str, str] = field(default_factory=dict)  # hidden node -> box id


def _signature(cluster: _Cluster, view: dict[str, ViewNode], order: dict[str, int],
               inputs: dict[str, list[str]], modules: dict[str, str]) -> tuple:
    names = sorted(_members(cluster), key=order.__getitem__)
    local = {n: i for i, n in enumerate(names)}
    return (modules.get(cluster.path, ""), tuple(
        (view[n].role, view[n].rec.kind, view[n].status, tuple(local.get(i, -1) for i in inputs.get(n, ())))
        for n in names))


def _collapse(cluster: _Cluster, ctx: tuple, out: _Collapse) -> None:
    """Top-down: within ``cluster``, keep the first of each run of equal sibling blocks, box the rest."""
    view, order, inputs, modules = ctx
    children = sorted(cluster.children, key=lambda c: min(order[n] for n in _members(c)))
    sigs = [_signature(c, view, order, inputs, modules) for c in children]
    kept: list[_Cluster] = []
    i = 0
    while i < len(children):
        j = i + 1
        while j < len(children) and sigs[j] == sigs[i] and _members(children[j]):
            j += 1
        kept.append(children[i])
        if j - i > 1:
            box = f"{_COLLAPSED}{len(out.boxes)}"
            out.boxes[box] = (children[i].path, children[i + 1:j])
            cluster.nodes.append(box)
            out.mapping.update({n: box for c in children[i + 1:j] for n in _members(c)})
        i = j
    cluster.children = kept
    for child in kept:
        _collapse(child, ctx, out)


def _box_label(first: str, repeats: list[_Cluster], modules: dict[str, str]) -> str:
    names = repeats[0].path if len(repeats) == 1 else f"{repeats[0].path} ... {repeats[-1].path}"
    cls = modules.get(repeats[0].path, "block")
    return _plain(names, f"{len(repeats)} x {cls}, same ops as {first}", "(collapsed: render with collapse=False)")


# ---- the digraph -----------------------------------------------------------------------------------------

def _legend(view: View, drawn: list[ViewNode], collapsed: bool) -> str:
    roles = [r for r in ROLES if any(vn.role == r for vn in drawn) or (r == "collapsed" and collapsed)]
    statuses = [s for s in STATUSES if any(vn.status == s for vn in drawn)]
    cells = [f'<td bgcolor="{ROLES[r][1]["fillcolor"]}">{html.escape(ROLES[r][0])}</td>' for r in roles]
    cells += [f'<td border="3" color="{STATUSES[s][1].get("color", "#000000")}">{html.escape(STATUSES[s][0])}</td>'
              for s in statuses]
    rows = ["<tr>" + "".join(cells[i:i + 6]) + "</tr>" for i in range(0, len(cells), 6)]
    width = min(len(cells), 6) or 1
    title = f'<tr><td colspan="{width}" border="0"><b>{html.escape(view.title)}</b></td></tr>' if view.title else ""
    return f'<<table border="0" cellborder="1" cellspacing="3" cellpadding="4">{title}{"".join(rows)}</table>>'


def digraph(view: View, collapse: bool | None = None, constants: bool = False) -> graphviz.Digraph:
    """The Graphviz digraph of ``view`` (see the module docstring for ``collapse`` and ``constants``)."""
    hidden = set() if constants else {vn.rec.name for vn in view.nodes if vn.role == "constant"}
    drawn = [vn for vn in view.nodes if vn.rec.name not in hidden]
    consts = {vn.rec.name: vn.rec.detail for vn in view.nodes if vn.role == "constant" and vn.rec.detail}
    by_name = {vn.rec.name: vn for vn in drawn}
    order = {vn.rec.name: i for i, vn in enumerate(drawn)}
    inputs: dict[str, list[str]] = {}
    for src, dst, _ in view.edges:
        if src in by_name and dst in by_name:
            inputs.setdefault(dst, []).append(src)

    root = _tree(drawn, inputs)
    folded = _Collapse()
    if collapse or (collapse is None and len(drawn) > AUTO_COLLAPSE_NODES):
        _collapse(root, (by_name, order, inputs, view.modules), folded)

    g = graphviz.Digraph(graph_attr={"rankdir": "TB", "labelloc": "t", "fontname": "Helvetica", "fontsize": "12",
                                     "label": _legend(view, drawn, bool(folded.boxes)), "nodesep": "0.25",
                                     "ranksep": "0.3"},
                         node_attr={"shape": "box", "fontname": "Helvetica", "fontsize": "10", "margin": "0.08,0.03"},
                         edge_attr={"color": "#636363", "arrowsize": "0.6"})
    _emit(g, root, by_name, consts, folded, view.modules, view.beside)
    seen: set[tuple[str, str]] = set()
    for src, dst, attrs in view.edges:
        if src in hidden or dst in hidden:
            continue
        a, b = folded.mapping.get(src, src), folded.mapping.get(dst, dst)
        if a != b and (a, b) not in seen:
            seen.add((a, b))
            g.edge(a, b, **attrs)
    return g


def _emit(g: graphviz.Digraph, cluster: _Cluster, by_name: dict[str, ViewNode], consts: dict[str, str],
          folded: _Collapse, modules: dict[str, str], beside: dict[str, str]) -> None:
    members = set(cluster.nodes)
    for a, b in beside.items():
        if a in members and b in members:
            with g.subgraph() as level:
                level.attr(rank="same")
                level.node(a)
                level.node(b)
    for name in cluster.nodes:
        if name in folded.boxes:
            first, repeats = folded.boxes[name]
            g.node(name, _box_label(first, repeats, modules), **node_style("collapsed"))
            continue
        vn = by_name[name]
        g.node(name, label(vn, consts), tooltip=tooltip(vn), **node_style(vn.role, vn.status))
    for child in cluster.children:
        cls = modules.get(child.path)
        with g.subgraph(name=f"cluster_{child.path}") as sub:
            sub.attr(label=_plain(child.path + (f" : {cls}" if cls else "")), style="rounded", color="#bdbdbd",
                     fontsize="10", fontcolor="#525252", labeljust="l")
            sub.attr("graph", **{"class": "module"})
            _emit(sub, child, by_name, consts, folded, modules, beside)

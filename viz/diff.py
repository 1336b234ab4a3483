"""What a pass changed: nodes of two snapshots matched by name and by provenance.

Passes record provenance with ``fxforge.graph.meta.record_rewrite``: a node they write lists the traced nodes it
computes in ``node.meta["fxforge"]["origins"]`` and names the pass in ``"rewritten_by"``. Matching:
- an *after* node whose name exists *before* is ``unchanged``, or ``rewritten`` when its op, target, origins
  or rewriting pass differ (fold-bn keeps the conv node and adds the BatchNorm to its origins);
- a new name that shares origins with a node that disappeared is ``rewritten`` (it replaces that node:
  fuse-conv's FusedConv replaces conv and relu); any other new name is ``added`` (quantize nodes);
- a *before* node whose name is gone is ``removed``, and "folded into X" when X's origins cover it.
Edges rewired to other inputs are not a change of the node: the drawing shows the new edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fxforge.graph.snapshot import GraphSnapshot, NodeRecord

from .dot import View, ViewNode
from .roles import role_of

_REMOVED_EDGE = {"style": "dashed", "color": "#cb181d"}


@dataclass
class GraphDiff:
    """Statuses by node name (after's nodes, and before's removed ones), and what replaced what."""

    status: dict[str, str]
    replaces: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rewritten after-node -> before nodes
    merged_into: dict[str, str] = field(default_factory=dict)  # removed before-node -> after node covering it

    def names(self, status: str) -> list[str]:
        return [n for n, s in self.status.items() if s == status]

    def summary(self) -> str:
        counts = {s: len(self.names(s)) for s in ("added", "removed", "rewritten")}
        return ", ".join(f"{n} {s}" for s, n in counts.items())


def _signature(rec: NodeRecord) -> tuple:
    return rec.op, rec.kind, rec.target, rec.origins, rec.rewritten_by


def compare(before: GraphSnapshot, after: GraphSnapshot) -> GraphDiff:
    """Match ``after`` against ``before`` (see the module docstring)."""
    old, new = before.by_name(), after.by_name()
    gone = {name: rec for name, rec in old.items() if name not in new}
    owner: dict[str, list[str]] = {}  # traced-node name -> removed before-nodes standing for it
    for name, rec in gone.items():
        for origin in rec.provenance:
            owner.setdefault(origin, []).append(name)
    result = GraphDiff({})
    for name, rec in new.items():
        if name in old:
            changed = _signature(rec) != _signature(old[name])
            result.status[name] = "rewritten" if changed else "unchanged"
            if changed:
                result.replaces[name] = (name,)
            continue
        replaced = tuple(dict.fromkeys(b for o in rec.provenance for b in owner.get(o, ())))
        result.status[name] = "rewritten" if replaced else "added"
        if replaced:
            result.replaces[name] = replaced
    covering = {o: name for name, rec in new.items() if result.status[name] != "unchanged" for o in rec.provenance}
    for name, rec in gone.items():
        result.status[name] = "removed"
        into = next((covering[o] for o in rec.provenance if o in covering), None)
        if into is not None:
            result.merged_into[name] = into
    return result


def _note(name: str, rec: NodeRecord, d: GraphDiff) -> str:
    status = d.status[name]
    if status == "removed":
        return f"removed: folded into {d.merged_into[name]}" if name in d.merged_into else "removed"
    if status == "rewritten":
        replaced = [r for r in d.replaces[name] if r != name]
        by = f" by {rec.rewritten_by}" if rec.rewritten_by else ""
        return f"rewritten{by}" + (f" (was {', '.join(replaced[:3])}{' ...' if len(replaced) > 3 else ''})"
                                   if replaced else "")
    return "added" if status == "added" else ""


def diff_view(before: GraphSnapshot, after: GraphSnapshot) -> View:
    """``after``'s nodes and edges plus ``before``'s removed nodes (dashed, with their old edges in red)."""
    d = compare(before, after)
    old = before.by_name()
    removed = [old[n] for n in d.names("removed")]
    nodes = [ViewNode(r, role_of(r), d.status[r.name], _note(r.name, r, d)) for r in (*after.nodes, *removed)]
    edges = [(i, r.name, {}) for r in after.nodes for i in r.inputs]
    gone = set(d.names("removed"))
    edges += [(i, r.name, dict(_REMOVED_EDGE)) for r in before.nodes for i in r.inputs if i in gone or r.name in gone]
    edges = [(a, b, attrs) for a, b, attrs in edges if a in d.status and b in d.status]
    modules = {**before.modules, **after.modules}
    title = f"{before.title or 'before'} -> {after.title or 'after'}: {d.summary()}"
    return View(nodes, edges, title, modules, beside=dict(d.merged_into))

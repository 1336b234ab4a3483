"""Looking at graphs: rendering, pass-by-pass diffs, the HTML report, and a networkx view.

- ``render(obj, path)``: a GraphModule, CompiledModule or report stage to .svg/.png/.pdf/.dot;
- ``diff(before, after, path)``: what a pass added, removed and rewrote;
- ``to_dot(obj)``: the DOT text; ``compare(before, after)``: the diff as data;
- ``to_networkx(gm)``: a networkx DiGraph for your own analysis.
``CompileReport.to_html(path)`` (``fxforge.viz.html``) puts them together in one page.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from fxforge.pipeline.renderers import register_renderers

from .diff import GraphDiff, compare
from .html import write_report
from .render import (
    GraphvizFailedWarning,
    GraphvizNotFoundWarning,
    GraphvizWarning,
    as_snapshot,
    diff,
    dot_available,
    render,
    to_dot,
)
from .roles import ROLES, role_of

register_renderers(html_report=write_report, dot=to_dot)  # the core's report page and dump_dir draw with viz


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph keyed by node name, with the fx node in each vertex's ``node`` attribute."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, node=node, op=node.op)
        g.add_edges_from((inp.name, node.name) for inp in node.all_input_nodes)
    return g


__all__ = ["ROLES", "GraphDiff", "GraphvizFailedWarning", "GraphvizNotFoundWarning", "GraphvizWarning", "as_snapshot",
           "compare", "diff", "dot_available", "render", "role_of", "to_dot", "to_networkx"]

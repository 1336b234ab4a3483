"""Looking at graphs: Graphviz DOT text and a networkx view of a GraphModule."""

from __future__ import annotations

import graphviz
import networkx as nx
from torch import fx

from fxforge.meta import tensor_shape

_ROLE_COLORS = {"placeholder": "lightblue", "output": "lightblue", "call_module": "khaki",
                "call_function": "white", "call_method": "white", "get_attr": "lightgrey"}


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        what = f"{node.target}\\n{type(gm.get_submodule(str(node.target))).__name__}"
    elif node.op in ("call_function", "call_method"):
        what = getattr(node.target, "__name__", str(node.target))
    else:
        what = node.name
    shape = tensor_shape(node)
    return what + (f"\\n{list(shape)}" if shape is not None else "")


def to_dot(gm: fx.GraphModule, title: str = "") -> str:
    """Graphviz DOT source for ``gm``: one box per node, coloured by op kind, with shapes where known."""
    dot = graphviz.Digraph(graph_attr={"label": title, "rankdir": "TB"}, node_attr={"shape": "box", "style": "filled"})
    for node in gm.graph.nodes:
        dot.node(node.name, _label(gm, node), fillcolor=_ROLE_COLORS.get(node.op, "white"))
        for inp in node.all_input_nodes:
            dot.edge(inp.name, node.name)
    return dot.source


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph keyed by node name, with the fx node in each vertex's ``node`` attribute."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, node=node, op=node.op)
        g.add_edges_from((inp.name, node.name) for inp in node.all_input_nodes)
    return g

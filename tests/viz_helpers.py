"""SVG queries for the viz tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET

_NS = {"s": "http://www.w3.org/2000/svg"}


def svg_nodes(svg: str) -> list[tuple[set[str], str]]:
    """(classes, text) of every node group in Graphviz SVG output."""
    nodes = []
    for g in ET.fromstring(svg).iterfind(".//s:g", _NS):
        classes = set(g.get("class", "").split())
        if "node" in classes:
            nodes.append((classes, " | ".join(t.text or "" for t in g.iterfind(".//s:text", _NS))))
    return nodes


def roles_in(svg: str) -> set[str]:
    return {c.removeprefix("role-") for classes, _ in svg_nodes(svg) for c in classes if c.startswith("role-")}


def nodes_with(svg: str, cls: str) -> list[str]:
    """Texts of the nodes carrying SVG class ``cls``."""
    return [text for classes, text in svg_nodes(svg) if cls in classes]

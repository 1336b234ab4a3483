"""Node roles (what a node is, for the eye) and diff statuses, with their Graphviz styles.

Roles are decided from a snapshot record alone (``fxforge.graph.snapshot.NodeRecord``), first match wins:
a pass's own hint (``node.meta["fxforge"]["role"]``, e.g. "layout"), graph input/output, constants,
quantize/dequantize, observers, layout conversions, fp32 islands of an int8 graph (the plan kept them in fp32
for a reason), fused ops (one node computing several traced ops, by provenance), conv/linear, other ops.
Each styled node carries ``class="node role-<role>"`` in SVG output, so pages and tests can find them.
"""

from __future__ import annotations

import re

from fxforge.graph.snapshot import NodeRecord

# role -> (legend text, Graphviz node attributes)
ROLES: dict[str, tuple[str, dict[str, str]]] = {
    "input": ("graph input", {"shape": "oval", "fillcolor": "#9ecae1"}),
    "output": ("graph output", {"shape": "oval", "fillcolor": "#9ecae1"}),
    "conv": ("convolution", {"fillcolor": "#fdd49e"}),
    "linear": ("linear / matmul", {"fillcolor": "#fee391"}),
    "fused": ("fused op (several traced ops in one)", {"fillcolor": "#fdae6b", "penwidth": "2"}),
    "quantize": ("quantize (fp32 -> int8)", {"shape": "invtrapezium", "fillcolor": "#a1d99b"}),
    "dequantize": ("dequantize (int8 -> fp32)", {"shape": "trapezium", "fillcolor": "#e5f5e0"}),
    "observer": ("observer (calibration)", {"shape": "ellipse", "fillcolor": "#dadaeb", "style": "filled,dashed"}),
    "fp32-island": ("fp32 island in an int8 graph", {"fillcolor": "#fcbba1", "color": "#cb181d", "penwidth": "2"}),
    "layout": ("layout conversion", {"shape": "hexagon", "fillcolor": "#d9d9d9"}),
    "constant": ("constant / parameter", {"shape": "note", "fillcolor": "#f7f7f7", "fontsize": "9"}),
    "op": ("other op", {"fillcolor": "#ffffff"}),
    "collapsed": ("repeated blocks (collapsed)", {"shape": "box3d", "fillcolor": "#efedf5"}),
}

# diff status -> (legend text, Graphviz node attributes laid over the role's)
STATUSES: dict[str, tuple[str, dict[str, str]]] = {
    "added": ("added by the pass", {"color": "#238b45", "penwidth": "3"}),
    "removed": ("removed by the pass", {"color": "#cb181d", "penwidth": "2", "style": "filled,dashed",
                                         "fillcolor": "#f0f0f0", "fontcolor": "#737373"}),
    "rewritten": ("rewritten by the pass", {"color": "#6a51a3", "penwidth": "3"}),
    "unchanged": ("unchanged", {}),
}

_QUANTIZE = {"quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic"}
_LAYOUT_KINDS = {"contiguous", "to_dense", "to_mkldnn"}
_LAYOUT_WORDS = re.compile(r"nhwc|nchw|channels_last|memory_format|layout", re.IGNORECASE)
_CONV = re.compile(r"conv(?!ert)", re.IGNORECASE)
_LINEAR = re.compile(r"linear|matmul|^bmm$|^mm$|^addmm$", re.IGNORECASE)


def _is_layout(rec: NodeRecord) -> bool:
    return rec.kind in _LAYOUT_KINDS or bool(_LAYOUT_WORDS.search(rec.kind))


def role_of(rec: NodeRecord) -> str:
    """The role of a node (see the module docstring)."""
    if rec.hint in ROLES:
        return rec.hint
    if rec.op == "placeholder":
        return "input"
    if rec.op == "output":
        return "output"
    if rec.op == "get_attr":
        return "constant"
    if rec.kind in _QUANTIZE:
        return "quantize"
    if rec.kind == "dequantize":
        return "dequantize"
    if _is_layout(rec):
        return "layout"
    if rec.quant_role == "float" and rec.reason:
        return "fp32-island"
    if len(rec.origins) > 1 or rec.kind.startswith("Fused"):
        return "fused"
    if _CONV.search(rec.kind):
        return "conv"
    return "linear" if _LINEAR.search(rec.kind) else "op"


def node_style(role: str, status: str | None = None) -> dict[str, str]:
    """Graphviz attributes for a node of ``role`` (and diff ``status``), including its SVG class."""
    attrs = {"style": "filled", **ROLES[role][1]}
    if status is not None:
        attrs.update(STATUSES[status][1])
    attrs["class"] = f"role-{role}" + (f" status-{status}" if status else "")
    return attrs

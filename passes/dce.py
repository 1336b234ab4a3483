"""dce: remove nodes whose results nobody uses, keeping operations with side effects.

Rewrites: unused ``call_function`` / ``call_method`` / ``call_module`` / ``get_attr`` nodes -> deleted.
Why correct: a pure node's only effect is its result; with no users it cannot affect the output.
Kept even when unused: in-place ops (``x.add_(1)``, ``torch.relu_``, ``operator.iadd``, ``nn.ReLU(inplace=True)``,
``F.relu(x, inplace=True)``) because they mutate a tensor someone else reads, and anything torch.fx
itself marks impure (asserts, RNG state, profiler ranges). Placeholders and the output are never removed.
Preconditions: none.

Before: ``a = conv(x); b = relu(x); return a``   After: ``a = conv(x); return a``
"""

from __future__ import annotations

import operator

from torch import fx

from fxforge.context import PassContext
from fxforge.pass_api import graph_pass

from .matching import module_of

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def has_side_effects(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when removing ``node`` could change what the program does, even with no users."""
    if node.op in ("placeholder", "output") or node.is_impure():
        return True
    if node.kwargs.get("inplace", False):
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_module":
        return bool(getattr(module_of(gm, node), "inplace", False))
    return False


@graph_pass(name="dce")
def dce(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Dead code elimination that keeps side effects."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not has_side_effects(gm, node):
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.delete_all_unused_submodules()
        ctx.note(f"removed {removed} unused node(s)")
    return removed > 0

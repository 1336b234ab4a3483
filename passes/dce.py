"""dce: remove nodes whose results nobody uses, keeping operations with side effects.

Rewrites: unused ``call_function`` / ``call_method`` / ``call_module`` / ``get_attr`` nodes -> deleted.
Why correct: a pure node's only effect is its result; with no users it cannot affect the output.
Kept even when unused: in-place ops (``x.add_(1)``, ``torch.relu_``, ``operator.iadd``, ``nn.ReLU(inplace=True)``,
``F.relu(x, inplace=True)``) because they mutate a tensor someone else reads, and anything torch.fx
itself marks impure (asserts, RNG state, profiler ranges). Placeholders and the output are never removed.
Preconditions: none. Removing a dead user can make a BatchNorm foldable that was not, so it invalidates
``bn-folded``; the target pipelines run it before fold-bn.

Before: ``a = conv(x); b = relu(x); return a``   After: ``a = conv(x); return a``
"""

from __future__ import annotations

from torch import fx

from fxforge.context import PassContext
from fxforge.pass_api import graph_pass

from .matching import has_side_effects


@graph_pass(name="dce", invalidates=("bn-folded",))
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

"""dce: remove nodes whose results nobody uses, keeping operations with side effects.

Rewrites: unused ``call_function`` / ``call_method`` / ``call_module`` / ``get_attr`` nodes -> deleted.
Why correct: a pure node's only effect is its result; with no users it cannot affect the output.
Also removed: unused in-place ops on a fresh value that nothing else reads (the mutation is unobservable).
Kept even when unused: other in-place ops (``x.add_(1)``, ``torch.relu_``, ``operator.iadd``, ``nn.ReLU(inplace=True)``,
``F.relu(x, inplace=True)``) because they mutate a tensor someone else reads, and anything torch.fx
itself marks impure (asserts, RNG state, profiler ranges). Placeholders and the output are never removed.
Preconditions: none. Removing a dead user can make a BatchNorm foldable that was not, so it invalidates
``bn-folded``, and a dead user keeps a value from being single-use; so the target pipelines run it right
after remove-noops, before the normalize, fold and fuse passes.

Before: ``a = conv(x); b = relu(x); return a``   After: ``a = conv(x); return a``
"""

from __future__ import annotations

from torch import fx

from fxforge.graph.matching import has_side_effects, mutates_only_private_value
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import graph_pass


def _unobservable_mutation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An unused in-place op on a value nobody else reads (``conv(x).add_(1)`` as dead code)."""
    return not node.is_impure() and mutates_only_private_value(gm, node)


def _sweep(gm: fx.GraphModule) -> int:
    """One backwards pass removing dead nodes; returns how many it removed."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and (not has_side_effects(gm, node) or _unobservable_mutation(gm, node)):
            gm.graph.erase_node(node)
            removed += 1
    return removed


def remove_dead_code(gm: fx.GraphModule) -> int:
    """Remove dead nodes to a fixed point (see the module docstring); returns how many went."""
    # Repeat: removing a dead reader later in the graph can make an earlier in-place op's mutation
    # unobservable, and one backwards sweep has already passed that op by then.
    removed = total = _sweep(gm)
    while removed:
        removed = _sweep(gm)
        total += removed
    return total


@graph_pass(name="dce", invalidates=("bn-folded",))
def dce(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Dead code elimination that keeps side effects."""
    total = remove_dead_code(gm)
    if total:
        gm.delete_all_unused_submodules()
        ctx.note(f"removed {total} unused node(s)")
    return total > 0

"""normalize-relu: one spelling of relu, ``torch.relu(x)``.

Rewrites: ``nn.ReLU()`` calls, ``F.relu(x)`` and ``x.relu()`` (all out-of-place) -> ``torch.relu(x)``.
Why correct: they compute the same function; only the spelling differs. In-place spellings are left to
``normalize-inplace``, which knows when dropping the mutation is safe.
Preconditions: none.

Before: ``y = self.relu(x)`` (nn.ReLU)   After: ``y = torch.relu(x)``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.context import PassContext
from fxforge.meta import record_rewrite
from fxforge.pass_api import graph_pass

from .matching import module_of


def _is_out_of_place_relu_spelling(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = module_of(gm, node)
        return isinstance(mod, nn.ReLU) and not mod.inplace
    if node.op == "call_function" and node.target is F.relu:
        return not node.kwargs.get("inplace", False) and (len(node.args) < 2 or node.args[1] is False)
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1


@graph_pass(name="normalize-relu")
def normalize_relu(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """nn.ReLU / F.relu / Tensor.relu -> torch.relu."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _is_out_of_place_relu_spelling(gm, node) or not isinstance(node.args[0], fx.Node):
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.relu, (node.args[0],))
        node.replace_all_uses_with(new)
        record_rewrite(new, "normalize-relu", node)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.delete_all_unused_submodules()
    return count > 0

"""remove-noops: delete operations that are the identity in eval mode.

Rewrites: ``nn.Dropout*`` / ``nn.AlphaDropout`` / ``nn.Identity`` calls, and ``F.dropout*(x, training=False)``
and ``torchvision.ops.stochastic_depth(x, ..., training=False)`` calls, by replacing their uses with their input.
Why correct: in eval mode these return their input unchanged (dropout only acts when training).
Preconditions: the graph holds the model in eval mode (property ``eval``). Removing a Dropout between a
conv and a BatchNorm makes the BN foldable, so it invalidates ``bn-folded``.

Before: ``x -> conv -> dropout -> linear``   After: ``x -> conv -> linear``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.context import PassContext
from fxforge.pass_api import graph_pass

from .matching import calls_module

_NOOP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout, nn.Identity)
_DROPOUT_FUNCTIONS = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
                      F.feature_alpha_dropout: 2, torch.dropout: 2}  # fn -> position of `training`


# torchvision.ops.stochastic_depth is fx-wrapped (a call_function, not traced through); matched by name so
# that torchvision stays an optional dependency.
_BY_NAME = {("torchvision.ops.stochastic_depth", "stochastic_depth"): 3}


def _training_arg_position(target: object) -> int | None:
    if target in _DROPOUT_FUNCTIONS:
        return _DROPOUT_FUNCTIONS[target]
    return _BY_NAME.get((getattr(target, "__module__", None), getattr(target, "__qualname__", None)))


def _is_eval_dropout_call(node: fx.Node) -> bool:
    pos = _training_arg_position(node.target) if node.op == "call_function" else None
    if pos is None:
        return False
    training = node.args[pos] if len(node.args) > pos else node.kwargs.get("training", node.kwargs.get("train"))
    # F.dropout (and stochastic_depth) default to training=True; a missing flag is not a no-op.
    return training is False


def _is_noop(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (calls_module(gm, node, _NOOP_MODULES) and len(node.args) == 1) or _is_eval_dropout_call(node)


@graph_pass(name="remove-noops", requires=("eval",), invalidates=("bn-folded",))
def remove_noops(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Remove eval-mode no-ops (Dropout, Identity)."""
    removed = 0
    for node in list(gm.graph.nodes):
        if _is_noop(gm, node) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.delete_all_unused_submodules()
        ctx.note(f"removed {removed} no-op(s)")
    return removed > 0

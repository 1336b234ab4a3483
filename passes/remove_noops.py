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

from fxforge.graph import patterns as P
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass

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


RULES = [
    # dropout(x) -> x, identity(x) -> x    (Dropout*, AlphaDropout, Identity modules; eval mode)
    P.Rule(lambda x: P.module(*_NOOP_MODULES)(x), lambda x: x, name="noop-module(x) -> x"),
    # F.dropout*(x, training=False) -> x, stochastic_depth(x, p, mode, training=False) -> x
    P.Rule(lambda x: P.any_node(where=_is_eval_dropout_call)(x), lambda x: x, name="dropout(x, training=False) -> x"),
]


@graph_pass(name="remove-noops", requires=("eval",), invalidates=("bn-folded",))
def remove_noops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove eval-mode no-ops (Dropout, Identity)."""
    result = P.rewrite(gm, RULES, ctx)
    if result.modified:
        ctx.note(f"removed {sum(result.matches.values())} no-op(s)")
    return result

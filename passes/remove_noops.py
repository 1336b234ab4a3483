"""remove-noops: delete operations that are the identity in eval mode.

Rewrites: ``nn.Dropout*`` / ``nn.AlphaDropout`` / ``nn.Identity`` calls, and ``F.dropout*(x, training=False)``
and ``torchvision.ops.stochastic_depth(x, ..., training=False)`` calls, by replacing their uses with their input.
Why correct: in eval mode these return their input unchanged (dropout only acts when training).
Preconditions: the graph holds the model in eval mode (property ``eval``). Removing a Dropout between a
conv and a BatchNorm makes the BN foldable, so it invalidates ``bn-folded``.

Before: ``x -> conv -> dropout -> linear``   After: ``x -> conv -> linear``
"""

from __future__ import annotations

from torch import fx

from fxforge.graph import patterns as P
from fxforge.graph.ops import op_name, out_of_place, spellings
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass

# the identity in eval mode: as modules always, as functions when called with training=False
_NOOPS = ("identity", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
_NOOP_MODULES = tuple(module for op in _NOOPS for module in spellings(op).modules)
_TRAINING = 2  # position of ``training`` in F.dropout*(x, p, training) and torch.dropout(x, p, train)


# torchvision.ops.stochastic_depth is fx-wrapped (a call_function, not traced through); matched by name so
# that torchvision stays an optional dependency.
_BY_NAME = {("torchvision.ops.stochastic_depth", "stochastic_depth"): 3}


def _training_arg_position(node: fx.Node) -> int | None:
    if out_of_place(op_name(node) or "") in _NOOPS:
        return _TRAINING
    target = node.target
    return _BY_NAME.get((getattr(target, "__module__", None), getattr(target, "__qualname__", None)))


def _is_eval_dropout_call(node: fx.Node) -> bool:
    pos = _training_arg_position(node) if node.op == "call_function" else None
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

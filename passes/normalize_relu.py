"""normalize-relu: one spelling of relu, ``torch.relu(x)``.

Rewrites: ``nn.ReLU()`` calls, ``F.relu(x)``, ``x.relu()`` and ``aten.relu`` (all out-of-place) -> ``torch.relu(x)``.
Why correct: they compute the same function; only the spelling differs. In-place spellings are left to
``normalize-inplace``, which knows when dropping the mutation is safe.
Preconditions: none.

Before: ``y = self.relu(x)`` (nn.ReLU)   After: ``y = torch.relu(x)``
"""

from __future__ import annotations

import torch
from torch import fx

from fxforge.graph import patterns as P
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass


def _as_torch_relu(m: P.Match) -> fx.Node | None:
    """The pattern matches every out-of-place spelling; torch.relu itself is already normal."""
    if m.anchor.op == "call_function" and m.anchor.target is torch.relu or not isinstance(m["x"], fx.Node):
        return None
    return m.graph.call_function(torch.relu, (m["x"],))


RULES = [
    # relu(x) spelled nn.ReLU()(x), F.relu(x), x.relu() -> torch.relu(x)
    P.Rule(lambda x: torch.relu(x), build=_as_torch_relu, name="relu(x) -> torch.relu(x)"),
]


@graph_pass(name="normalize-relu")
def normalize_relu(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """nn.ReLU / F.relu / Tensor.relu -> torch.relu."""
    return P.rewrite(gm, RULES, ctx)

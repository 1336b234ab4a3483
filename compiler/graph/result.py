"""``PassResult``: what a pass (or a rewrite with ``fxforge.patterns``) returns. It lives here, below the pass
infrastructure, because rewrites in this package return it too."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed, and notes for the report."""

    gm: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)
    matches: dict[str, int] = field(default_factory=dict)  # rewrite rule -> times it fired (fxforge.patterns)

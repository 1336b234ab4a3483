"""Graph verification after each pass: structure (lint) and per-property invariants.

A pass module declares the invariant of a property it provides with ``@invariant("bn-folded")``: a
function that returns a description of the violation, or None when the graph satisfies the property.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

Invariant = Callable[[fx.GraphModule], "str | None"]
_INVARIANTS: dict[str, Invariant] = {}


def invariant(prop: str) -> Callable[[Invariant], Invariant]:
    def register(fn: Invariant) -> Invariant:
        _INVARIANTS[prop] = fn
        return fn

    return register


@invariant("eval")
def _all_modules_in_eval(gm: fx.GraphModule) -> str | None:
    training = [name for name, m in gm.named_modules() if m.training]
    return f"modules in training mode: {', '.join(training[:5])}" if training else None


def verify_graph(gm: fx.GraphModule, properties: set[str]) -> list[str]:
    """Problems found in ``gm`` (empty when it verifies)."""
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises plain RuntimeError/AssertionError for malformed graphs
        return [f"graph does not lint: {exc}"]
    problems = []
    for prop in sorted(properties):
        check = _INVARIANTS.get(prop)
        problem = check(gm) if check else None
        if problem:
            problems.append(f"property '{prop}' does not hold: {problem}")
    return problems

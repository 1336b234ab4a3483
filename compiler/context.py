"""PassContext: what a pass may read besides the graph (example inputs, shapes, options, the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from .report import CompileReport


def clone_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


@dataclass
class PassContext:
    """Shared state of one compile. Passes record notes through ``note`` and read shapes through ``shapes``."""

    example_inputs: tuple[Any, ...]
    report: CompileReport
    target: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    properties: set[str] = field(default_factory=set)
    reference_outputs: Any = None
    _shapes_fresh: bool = False
    _notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        """A line for the report under the running pass (e.g. why something was *not* rewritten)."""
        self._notes.append(message)

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    def fresh_inputs(self) -> tuple[Any, ...]:
        """Copies of the example inputs: running the model must not change the caller's tensors."""
        return clone_inputs(self.example_inputs)

    def graph_changed(self) -> None:
        self._shapes_fresh = False

    def shapes(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Make sure every node's ``meta["tensor_meta"]`` matches the current graph (re-propagates if stale)."""
        if not self._shapes_fresh:
            with torch.no_grad():
                ShapeProp(gm).propagate(*self.fresh_inputs())
            self._shapes_fresh = True
        return gm

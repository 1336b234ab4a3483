"""PassContext: what a pass may read besides the graph (example inputs, shapes, options, the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxforge.capture.signature import CallSignature
from fxforge.quant.config import QuantOptions
from fxforge.quant.observers import observers_paused

from .report import CompileReport


def clone_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


@dataclass
class PassContext:
    """Shared state of one compile. Passes record notes through ``note`` and read shapes through ``shapes``."""

    example_inputs: tuple[Any, ...]
    report: CompileReport
    target: str = "cpu"
    properties: set[str] = field(default_factory=set)
    reference_outputs: Any = None
    quant: QuantOptions | None = None  # int8 targets: mode, backend, per-layer config, calibration data
    artifacts: dict[str, Any] = field(default_factory=dict)  # what passes hand to the CompiledModule
    current_pass: str = ""  # set by the PassManager: the name rewrites record as their author
    signature: CallSignature | None = None  # the compiled call's shape contract (which input dims are dynamic)
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

    def shapes(self, gm: fx.GraphModule, refresh: bool = False) -> fx.GraphModule:
        """Make sure every node carries shape metadata (``meta["type"]``, and ``meta["tensor_meta"]`` for tensors).

        Rewrites keep values' shapes and copy the metadata to the nodes they create (``record_rewrite``), so
        shapes are propagated by running the graph only when some node lacks them: at the start, and after a
        pass that added nodes without metadata (running the model after every pass would dominate compile
        time at large batches). A pass that changes the shape an existing node computes passes ``refresh=True``.
        """
        if refresh or any("type" not in n.meta for n in gm.graph.nodes if n.op != "output"):
            self.propagate(gm)
        return gm

    def propagate(self, gm: fx.GraphModule) -> Any:
        """Run ``gm`` on (copies of) the example inputs, recording shapes in node.meta; returns its output.
        Observers in ``gm`` do not record these inputs: they are not calibration data."""
        with torch.no_grad(), observers_paused():
            return ShapeProp(gm).propagate(*self.fresh_inputs())

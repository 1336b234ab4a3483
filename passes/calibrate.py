"""calibrate: run the calibration data through the observed graph so every observer sees real values.

Rewrites nothing (the graph is unchanged); it fills the observers' statistics, from which insert-qdq
computes qparams. Observers that already hold statistics (trained FakeQuantize modules of a QAT model)
need no data; when every observer has statistics, calibration data is optional.
Fails loudly: no data -> CalibrationError that suggests dynamic quantization; an observer that saw nothing
(a branch the data never took) -> CalibrationError naming the value and its layer, never a silent scale 1.0.
Preconditions: ``observed`` (insert-observers ran).

Before: ``y1 = observer_1(conv(x1))`` (no statistics)   After: the same graph; observer_1 holds the data's range
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxforge.errors import CalibrationError
from fxforge.graph.matching import module_of
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.quant.calibration import CHECK_BATCH, run_calibration
from fxforge.quant.plan import observer_nodes, stored

from .insert_observers import quant_options


def _unseen(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in observer_nodes(gm) if module_of(gm, n).batches_seen == 0]


def _describe(node: fx.Node) -> str:
    value = node.args[0]
    return f"'{value.name}' (layer '{stored(value).get('layer') or '<root>'}', observer {node.target})"


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    """Feed the calibration data through the observers."""

    name = "calibrate"
    requires = frozenset({"observed"})
    provides = frozenset({"calibrated"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = quant_options(ctx, self.name)
        if not _unseen(gm):
            return PassResult(gm, False, ["every observer already holds statistics (trained QAT fake-quants)"])
        device = next((x.device for x in ctx.example_inputs if hasattr(x, "device")), "cpu")
        used, dropped, last = run_calibration(gm, opts.calibration, opts.calibration_batches, device)
        ctx.artifacts["calibration_batches"] = used
        ctx.artifacts[CHECK_BATCH] = last
        notes = [f"calibrated on {used} batches"]
        if dropped:
            notes.append("calibration items had more values than the model takes: used the leading ones "
                         "(labels ignored)")
        unseen = _unseen(gm)
        if unseen:
            raise CalibrationError(
                f"{len(unseen)} observer(s) saw no calibration data: {', '.join(map(_describe, unseen[:5]))}. "
                f"The calibration batches never reached these values (a branch not taken?): add data that "
                f"exercises them, or keep the layer in fp32 with skip=[...]")
        return PassResult(gm, False, notes)

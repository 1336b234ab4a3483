"""correct-bias: empirical bias correction of int8 weights (Nagel et al. 2019, section 4.2), optional.

Rounding a layer's weights onto the int8 grid shifts the *mean* of its output: ``E[W_q x] - E[W x] =
(W_q - W) E[x]`` is not zero when the inputs have a non-zero mean (they do after a relu), and later layers
inherit the shift. For each quantized conv/linear, in graph order, on data run through the reference int8
graph: ``delta_c = mean(conv(x, W_q) - conv(x, W))`` per output channel ``c`` (``x``: the layer's own, already
quantized and corrected, input; ``W``: the fp32 weight kept in the observed graph), then ``bias_c -= delta_c``.
Why correct: only biases change, so that each layer's output mean on the data matches fp32's; lowering packs
the corrected bias with the int8 weight. (insert-qdq's per-layer SQNR table was measured before it.)
Data: the calibration items when they can be read again (concatenated along the batch dimension, at most
``calibration_batches``), else, or if the graph does not run on that batch, the example inputs.
Preconditions: ``quantized`` (insert-qdq ran, with the observed graph kept); before ``lower-<engine>``.

Before: ``y = conv(dq(x))`` with bias ``b``   After: the same graph, with bias ``b - delta``
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.matching import call_count, module_of
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass
from fxforge.quant.calibration import as_args, input_names
from fxforge.quant.ops import weighted_layer
from fxforge.quant.plan import stored

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _targets(gm: fx.GraphModule, observed: fx.GraphModule) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """compute node name -> (its int8-weight layer, that layer's fp32 weight from the observed graph)."""
    out = {}
    for node in gm.graph.nodes:
        layer = weighted_layer(module_of(gm, node)) if stored(node).get("role") == "compute" else None
        if type(layer) in (*_CONVS, nn.Linear) and hasattr(layer, "weight_scale") \
                and call_count(gm, str(node.target)) == 1:  # a shared layer would be corrected once per call
            original = weighted_layer(observed.get_submodule(str(node.target)))
            out[node.name] = (layer, original.weight.detach())
    return out


def _output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return layer._conv_forward(x, weight, None) if isinstance(layer, _CONVS) else F.linear(x, weight)


class _Correct(fx.Interpreter):
    """Runs the reference int8 graph, correcting each target layer's bias before running it."""

    def __init__(self, gm: fx.GraphModule, targets: dict[str, tuple[nn.Module, torch.Tensor]]) -> None:
        super().__init__(gm)
        self.targets, self.shifts = targets, {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.targets:
            layer, fp32_weight = self.targets[n.name]
            x = self.fetch_args_kwargs_from_env(n)[0][0]
            shift = _output(layer, x, layer.weight) - _output(layer, x, fp32_weight)
            dims = [d for d in range(shift.dim()) if d != (1 if isinstance(layer, _CONVS) else shift.dim() - 1)]
            delta = shift.mean(dims)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
            layer.bias.data -= delta
            self.shifts[n.name] = delta.abs().max().item()
        return super().run_node(n)


def _data(gm: fx.GraphModule, ctx: PassContext) -> tuple[tuple, str] | None:
    """(concatenated calibration batches as forward args, description), when they can be read again."""
    opts = ctx.quant
    items = opts.calibration if opts is not None else None
    if isinstance(items, torch.Tensor):
        items = [items]
    if not isinstance(items, (list, tuple)) or not items:
        return None
    device = next((x.device for x in ctx.example_inputs if isinstance(x, torch.Tensor)), "cpu")
    chosen = list(itertools.islice(items, opts.calibration_batches)) if opts.calibration_batches else list(items)
    batches = [as_args(item, input_names(gm), device)[0] for item in chosen]
    try:
        return tuple(torch.cat(parts) for parts in zip(*batches, strict=True)), f"{len(batches)} calibration batches"
    except (RuntimeError, TypeError, ValueError):  # ragged shapes or non-tensor arguments
        return None


def _run(gm: fx.GraphModule, targets: dict, args: tuple) -> dict[str, float]:
    interp = _Correct(gm, targets)
    with torch.no_grad():
        interp.run(*args)
    return interp.shifts


@graph_pass(name="correct-bias", requires=("quantized",))
def correct_bias(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Empirical bias correction of the int8 conv/linear layers (see the module docstring)."""
    observed = ctx.artifacts.get("observed_graph")
    if observed is None:
        return PassResult(gm, False, ["no fp32 weights kept (static int8 only): nothing corrected"])
    targets = _targets(gm, observed)
    saved = {name: None if layer.bias is None else layer.bias.detach().clone() for name, (layer, _) in targets.items()}
    data = _data(gm, ctx)
    try:
        shifts = _run(gm, targets, data[0]) if data is not None else None
    except Exception:  # e.g. a batch size baked into a reshape: undo what ran, use the example inputs
        for name, (layer, _) in targets.items():
            if saved[name] is None:
                layer.bias = None
            else:
                layer.bias.data.copy_(saved[name])
        shifts = None
    if shifts is None:
        shifts, data = _run(gm, targets, ctx.fresh_inputs()), (None, "the example inputs")
    worst = max(shifts.values(), default=0.0)
    return PassResult(gm, bool(shifts), [f"corrected the bias of {len(shifts)} layer(s) on {data[1]} "
                                         f"(largest per-channel shift {worst:.3g})"])

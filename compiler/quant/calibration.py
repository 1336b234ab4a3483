"""Running calibration data through an observed graph (used by the ``calibrate`` pass and ``recalibrate``).

Calibration data is any iterable of model inputs: a tensor per item, or a tuple/list of positional args.
Items with more values than the model takes (a DataLoader over ``(input, label)`` pairs) are cut to the
model's arguments, and the report says so. ``batches`` caps how many items are used; a tqdm bar shows
progress when stderr is a terminal.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from fxforge.errors import CalibrationError


def _placeholder_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "placeholder")


def as_args(item: Any, arity: int, device: torch.device | str) -> tuple[tuple[Any, ...], bool]:
    """One calibration item -> (positional args, whether extra values such as labels were dropped)."""
    values = tuple(item) if isinstance(item, (tuple, list)) else (item,)
    if not values or not all(isinstance(v, torch.Tensor) or not isinstance(v, (tuple, list)) for v in values):
        raise CalibrationError(f"a calibration item must be a tensor or a tuple of forward arguments, "
                               f"got {type(item).__name__}")
    dropped = len(values) > arity
    values = values[:arity]
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values), dropped


def _total(data: Iterable[Any], batches: int | None) -> int | None:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return batches
    return min(n, batches) if batches is not None else n


def run_calibration(gm: fx.GraphModule, data: Iterable[Any], batches: int | None, device: torch.device | str,
                    desc: str = "calibrating") -> tuple[int, bool]:
    """Feed ``data`` through ``gm`` without gradients; returns (batches used, labels dropped)."""
    if data is None:
        raise CalibrationError("no calibration data: pass calibration=<iterable of model inputs> (a list of "
                               "tensors, a generator or a DataLoader), or quantization='dynamic', which needs none")
    if isinstance(data, torch.Tensor):
        data = [data]  # one batch given directly
    if batches is not None and batches < 1:
        raise CalibrationError(f"calibration_batches={batches}: use a positive number or None for all")
    arity, used, dropped = _placeholder_count(gm), 0, False
    items = itertools.islice(data, batches) if batches is not None else data
    with torch.no_grad():
        for item in tqdm(items, total=_total(data, batches), desc=desc, unit="batch", disable=None, leave=False):
            args, cut = as_args(item, arity, device)
            gm(*args)
            used, dropped = used + 1, dropped or cut
    if used == 0:
        raise CalibrationError("the calibration data was empty (an exhausted generator?): give at least one batch")
    return used, dropped


def recalibrate(compiled: Any, data: Iterable[Any], batches: int | None = None) -> dict[str, tuple[float, float]]:
    """Refresh a static int8 model's activation qparams from new data (distribution drift), in place.

    The compiled module keeps its fp32 graph with observers; the observers are reset, fed ``data``, and the
    new scales / zero points are written into the compiled graph's qparam buffers. Weights, the graph and
    its kernels stay as they are: no recompilation. Submodules with a ``refresh_qparams()`` method (lowered
    kernels that cache qparams) are told to re-read them. Returns {scale buffer name: (old, new scale)}.
    """
    from fxforge.meta import fxmeta

    from .plan import OBSERVER_KEY, group_buffers, observer_nodes  # here: plan imports the op table
    from .qat_modules import FakeQuantize
    from .qspec import backend_quant

    observed, opts = getattr(compiled, "observed_graph", None), getattr(compiled, "quant_options", None)
    if observed is None or opts is None:
        raise CalibrationError("recalibrate needs a model compiled for an int8 target with static quantization "
                               "(quantization='static'); dynamic int8 picks its activation ranges per call")
    modules = {fxmeta(n)[OBSERVER_KEY]: observed.get_submodule(str(n.target)) for n in observer_nodes(observed)}
    for module in modules.values():
        (module.observer if isinstance(module, FakeQuantize) else module).reset()
        module.train(isinstance(module, FakeQuantize))  # a trained fake-quant observes only in train mode
    device = next((b.device for b in compiled.graph_module.buffers()), "cpu")
    try:
        run_calibration(observed, data, batches, device, desc="recalibrating")
    finally:
        observed.eval()
    spec = backend_quant(opts.backend, opts.reduce_range).activation
    changes = {}
    for gid, module in modules.items():
        scale, zero_point = (module.observer if isinstance(module, FakeQuantize) else module).qparams(spec)
        scale_name, zp_name = group_buffers(gid)
        changes[scale_name] = (float(getattr(compiled.graph_module, scale_name)), float(scale))
        getattr(compiled.graph_module, scale_name).copy_(scale.reshape(()))
        getattr(compiled.graph_module, zp_name).copy_(zero_point.reshape(()))
    for module in compiled.graph_module.modules():
        if hasattr(module, "refresh_qparams"):
            module.refresh_qparams()
    return changes

"""Running calibration data through an observed graph (used by the ``calibrate`` pass and ``recalibrate``).

Calibration data is any iterable of model inputs: a tensor per item, a tuple/list of positional args, or a
dict of them by forward argument name. The inputs are the forward arguments compile was given examples for
(arguments it bound to their defaults, such as ``flag=False``, keep their traced value). Items with more
values than that (a DataLoader over ``(input, label)`` pairs, a dict with a label key) are cut to the model's
inputs, and the report says so; items with fewer, a tensor of another rank than the example's (a missing batch
dimension), NaN / inf values, or a batch the model fails on raise CalibrationError. The model runs on copies: a
model that changes its input in place leaves the caller's data alone.
``batches`` caps how many items are used; a tqdm bar shows progress when stderr is a terminal.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import fx

from fxforge.errors import CalibrationError
from fxforge.graph.meta import fxmeta
from fxforge.progress import bar

from .plan import OBSERVER_KEY, QPARAMS_KEY, group_buffers, observer_nodes
from .qat_modules import FakeQuantize
from .qspec import backend_quant


def input_names(gm: fx.GraphModule) -> list[str]:
    """The forward arguments calibration items supply: placeholders compile did not bind to a value."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder" and not fxmeta(n).get("bound")]


def _values(item: Any, names: list[str]) -> tuple[Any, ...]:
    """An item's values in argument order (possibly more than ``names``: labels)."""
    if isinstance(item, dict):
        missing = [name for name in names if name not in item]
        if missing:
            raise CalibrationError(f"a calibration item has no value for '{missing[0]}' (keys: "
                                   f"{', '.join(map(str, item))}): dict items map forward argument names to values")
        return (*(item[name] for name in names), *(v for k, v in item.items() if k not in names))
    return tuple(item) if isinstance(item, (tuple, list)) else (item,)


def as_args(item: Any, names: list[str], device: torch.device | str) -> tuple[tuple[Any, ...], bool]:
    """One calibration item -> (positional args, whether extra values such as labels were dropped)."""
    values = _values(item, names)
    used = values[:len(names)]  # what follows (labels) is never looked at
    if not values or not all(isinstance(v, torch.Tensor) or not isinstance(v, (tuple, list)) for v in used):
        raise CalibrationError(f"a calibration item must be a tensor, a tuple of forward arguments or a dict of "
                               f"them by name, got {type(item).__name__}")
    if len(values) < len(names):
        raise CalibrationError(f"a calibration item has {len(values)} value(s) but the model takes {len(names)} "
                               f"inputs ({', '.join(names)}): give a tuple with one value per input, or a dict")
    dropped = len(values) > len(names)
    # a copy: a model that changes its input in place (x += 1) must not change the caller's data
    return tuple(v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for v in used), dropped


def _input_ranks(gm: fx.GraphModule) -> list[int | None]:
    """Rank of each calibrated input as the example inputs had it (None when unknown or not a tensor)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not fxmeta(n).get("bound")]
    return [len(n.meta["tensor_meta"].shape) if hasattr(n.meta.get("tensor_meta"), "shape") else None
            for n in placeholders]


def _check_batch(args: tuple[Any, ...], names: list[str], ranks: list[int | None], index: int) -> None:
    """A batch of another rank than the example (a missing batch dimension) may run, on wrong statistics;
    NaN / inf values would be skipped by the observers, leaving ranges from whatever else there was."""
    for name, value, rank in zip(names, args, ranks, strict=False):
        if not isinstance(value, torch.Tensor):
            continue
        if rank is not None and value.dim() != rank:
            raise CalibrationError(
                f"calibration batch {index}: input '{name}' has shape {tuple(value.shape)}, {value.dim()} dims where "
                f"example_inputs had {rank} (a missing or extra batch dimension?): give batches shaped like the "
                f"example inputs (the batch size may differ)")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CalibrationError(
                f"calibration batch {index}: input '{name}' contains NaN or inf values, which have no int8 range: "
                f"drop or clean such batches (e.g. torch.nan_to_num) before calibrating")


def _run_batch(gm: fx.GraphModule, args: tuple[Any, ...], index: int) -> None:
    try:
        gm(*args)
    except Exception as exc:  # bad data, not a compiler bug: say so instead of failing the pass
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CalibrationError(f"calibration batch {index} failed in the model with {type(exc).__name__}: {first}. "
                               f"Calibration items must be model inputs like example_inputs") from exc


def _iterable(data: Any) -> bool:
    try:
        iter(data)
    except TypeError:
        return False
    return True


def _total(data: Iterable[Any], batches: int | None) -> int | None:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return batches
    return min(n, batches) if batches is not None else n


CHECK_BATCH = "calibration_check_batch"  # PassContext artifact: the last calibration batch's arguments


class CalibrationRun(NamedTuple):
    """What ``run_calibration`` fed: how many batches, whether labels were dropped, and the last batch's
    arguments (compile checks the int8 model's output on it: real data, where the example inputs may not be)."""

    used: int
    dropped: bool
    last: tuple[Any, ...]


def run_calibration(gm: fx.GraphModule, data: Iterable[Any], batches: int | None, device: torch.device | str,
                    desc: str = "calibrating") -> CalibrationRun:
    """Feed ``data`` through ``gm`` without gradients."""
    if data is None:
        raise CalibrationError("no calibration data: pass calibration=<iterable of model inputs> (a list of "
                               "tensors, a generator or a DataLoader), or quantization='dynamic', which needs none")
    if isinstance(data, torch.Tensor):
        data = [data]  # one batch given directly
    if isinstance(data, (str, bytes)) or not _iterable(data):
        raise CalibrationError(f"calibration must be an iterable of model inputs (a list of tensors, a generator or "
                               f"a DataLoader), got {type(data).__name__}")
    if batches is not None and (not isinstance(batches, int) or batches < 1):
        raise CalibrationError(f"calibration_batches={batches}: use a positive integer or None for all")
    names, ranks, used, dropped, last = input_names(gm), _input_ranks(gm), 0, False, None
    items = itertools.islice(data, batches) if batches is not None else data
    with torch.no_grad():
        for item in bar(items, total=_total(data, batches), desc=desc, unit="batch"):
            args, cut = as_args(item, names, device)
            _check_batch(args, names, ranks, used)
            _run_batch(gm, args, used)
            used, dropped, last = used + 1, dropped or cut, item
    if used == 0:
        raise CalibrationError("the calibration data was empty (an exhausted generator?): give at least one batch")
    # converted again from the caller's item: the model may have changed its copy in place
    return CalibrationRun(used, dropped, as_args(last, names, device)[0])


def recalibrate(compiled: Any, data: Iterable[Any], batches: int | None = None) -> dict[str, tuple[float, float]]:
    """Refresh a static int8 model's activation qparams from new data (distribution drift), in place.

    The compiled module keeps its fp32 graph with observers; the observers are reset, fed ``data``, and the
    new scales / zero points are written into the compiled graph's qparam buffers. Weights, the graph and
    its kernels stay as they are: no recompilation. Lowered int8 kernels, which take qparams as literals,
    re-read them (only the graph's generated Python code is regenerated). Returns {scale buffer name: (old, new scale)}.
    """
    observed, opts = getattr(compiled, "observed_graph", None), getattr(compiled, "quant_options", None)
    if observed is None or opts is None:
        raise CalibrationError("recalibrate needs a model compiled for an int8 target with static quantization "
                               "(quantization='static'); dynamic int8 picks its activation ranges per call. A model "
                               "from fxforge.load keeps its observers only when saved with recalibratable=True")
    modules = {fxmeta(n)[OBSERVER_KEY]: observed.get_submodule(str(n.target)) for n in observer_nodes(observed)}
    if any(not hasattr(compiled.graph_module, group_buffers(gid)[0]) for gid in modules):
        raise CalibrationError(f"target {getattr(compiled, 'target', '?')!r} holds its activation qparams inside "
                               "the runtime it compiled the model for, which takes no new ones: compile again with "
                               "the new calibration data")
    for module in modules.values():
        (module.observer if isinstance(module, FakeQuantize) else module).reset()
        module.train(isinstance(module, FakeQuantize))  # a trained fake-quant observes only in train mode
    device = next((t.device for t in (*observed.parameters(), *observed.buffers())), "cpu")
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
    _refresh_kernel_qparams(compiled.graph_module)
    return changes


def _refresh_kernel_qparams(gm: fx.GraphModule) -> None:
    """Lowered int8 kernels take their output qparams as literals: re-read them from the buffers."""
    changed = False
    for node in gm.graph.nodes:
        buffers = fxmeta(node).get(QPARAMS_KEY)
        if buffers is not None:
            scale, zero_point = (getattr(gm, name) for name in buffers)
            node.args = (*node.args[:-2], float(scale), int(zero_point))
            changed = True
    if changed:
        gm.recompile()

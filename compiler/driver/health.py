"""Checks after a compile for what makes the compiled model worse than it looks, said out loud.

Each finding is one line per kind and compile (never one per layer), logged as a warning through this
module's logger (under ``fxforge``) and kept in ``report.warnings``:
- int8 output SQNR against fp32 below ``QuantConfig.min_sqnr_db`` (10 dB by default), on the example inputs
  and on the last calibration batch: names the worst layer and the widest observer ranges (one calibration
  batch far out of range widens every range until the output rounds to zero); under ``verify="numeric"``
  it raises ``NumericMismatchError`` instead;
- observers that saw NaN / inf values while calibrating (an overflow inside the model);
- submodules kept as leaves because tracing them failed, fp32 islands, BatchNorms left unfolded, and
  forward hooks of the model that the compiled graph no longer runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import fx, nn

from fxforge.errors import NumericMismatchError
from fxforge.pipeline.context import PassContext, clone_inputs
from fxforge.pipeline.report import CompileReport, QuantLayerRecord
from fxforge.quant.calibration import CHECK_BATCH
from fxforge.quant.config import QuantOptions
from fxforge.quant.observers import Observer, observers_paused
from fxforge.quant.plan import observer_nodes, stored
from fxforge.quant.qat_modules import FakeQuantize
from fxforge.quant.qspec import backend_quant, quantized_engine
from fxforge.quant.sqnr import outputs_sqnr_db

log = logging.getLogger(__name__)

SHOWN = 5  # names listed per warning


# True while a search compiles candidates: their findings are kept in each candidate's report, and only the
# chosen one's are logged (``announce``), not one copy per candidate.
_DEFERRED: ContextVar[bool] = ContextVar("fxforge_health_deferred", default=False)


def warn(report: CompileReport, message: str) -> None:
    """Log ``message`` as a warning (unless ``deferred``) and keep it in the report."""
    if not _DEFERRED.get():
        log.warning("%s", message)
    report.warnings.append(message)


@contextmanager
def deferred() -> Iterator[None]:
    """Compiles inside keep their warnings in their reports without logging them (a search's candidates)."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def announce(report: CompileReport, already: Iterable[str] = ()) -> None:
    """Log the warnings of a compile built under ``deferred`` (the one a search chose), except ``already``
    logged ones."""
    seen = set(already)
    for message in report.warnings:
        if message not in seen:
            log.warning("%s", message)


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


# ---- structure ---------------------------------------------------------------------------------------------

def _hooked(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}


def dropped_hooks(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Module paths of ``model`` with forward (pre-)hooks that ``gm`` does not run: the module was traced
    through, fused or lowered, so no call of it with its hooks is left."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    kept = {path for path in called if path in _hooked(gm)}
    return [path or "<root>" for path in _hooked(model) if path not in kept]


def structure_warnings(report: CompileReport, model: nn.Module, gm: fx.GraphModule) -> None:
    if report.leaf_modules:
        warn(report, f"{len(report.leaf_modules)} submodule(s) kept as leaves because tracing into them failed "
                     f"(they run as-is, unoptimized): {_listed(p or '<root>' for p in report.leaf_modules)}")
    if report.quantization is not None and report.quantization.islands:
        islands = report.quantization.islands
        warn(report, f"{len(islands)} op(s) run in fp32 between int8 neighbours (fp32 islands, with a dequantize "
                     f"and quantize each): {_listed(i.split(':')[0] for i in islands)}; the report lists why")
    norms = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)]
    if norms:
        warn(report, f"{len(norms)} BatchNorm(s) kept as separate ops (no conv or linear to fold into): "
                     f"{_listed(norms)}")
    dropped = dropped_hooks(model, gm)
    if dropped:
        warn(report, f"forward hooks of {len(dropped)} module(s) do not run in the compiled model (traced "
                     f"through, fused or lowered): {_listed(dropped)}; call them on the eager model instead")


# ---- int8 numerics -----------------------------------------------------------------------------------------

def _observer(module: nn.Module) -> Observer:
    return module.observer if isinstance(module, FakeQuantize) else module


def observer_ranges(observed: fx.GraphModule, quant: QuantOptions) -> dict[str, tuple[float, float]]:
    """layer -> the float range its activation observer chose (the widest, when a layer has several)."""
    spec = backend_quant(quant.backend, quant.reduce_range).activation
    ranges: dict[str, tuple[float, float]] = {}
    for node in observer_nodes(observed):
        value = node.args[0]
        layer = "<input>" if value.op == "placeholder" else (stored(value).get("layer") or "<root>")
        lo, hi = (float(t.min()) for t in _observer(observed.get_submodule(str(node.target))).calculate_range(spec))
        old = ranges.get(layer, (lo, hi))
        ranges[layer] = (min(lo, old[0]), max(hi, old[1]))
    return ranges


def nonfinite_observers(observed: fx.GraphModule) -> list[str]:
    """Layers whose observer saw NaN / inf while calibrating."""
    return [stored(n.args[0]).get("layer") or n.args[0].name for n in observer_nodes(observed)
            if _observer(observed.get_submodule(str(n.target))).saw_nonfinite()]


def _sample_sqnr(gm: fx.GraphModule, observed: fx.GraphModule, sample: tuple, engine: str | None) -> float | None:
    """The compiled graph's output SQNR against the fp32 (observed) graph on one calibration batch; None when
    the graph does not run on it (e.g. a batch size baked in while tracing)."""
    try:
        with torch.inference_mode(), observers_paused():
            reference = observed(*clone_inputs(sample))
        with torch.inference_mode(), quantized_engine(engine):
            return outputs_sqnr_db(reference, gm(*clone_inputs(sample)))
    except Exception as exc:  # the check is best effort: the example inputs were measured already
        log.debug("output check on the last calibration batch skipped: %s: %s", type(exc).__name__, exc)
        return None


def _low(db: float) -> float:
    return -math.inf if math.isnan(db) else db


def _worst_layer(layers: list[QuantLayerRecord]) -> QuantLayerRecord | None:
    """The layer adding the most error (lowest local SQNR), else the lowest accumulated SQNR."""
    for attr in ("local_sqnr_db", "sqnr_db"):
        rated = [r for r in layers if getattr(r, attr) is not None]
        if rated:
            return min(rated, key=lambda r: _low(getattr(r, attr)))
    return None


def _range_text(ranges: dict[str, tuple[float, float]], layer: str) -> str:
    lo, hi = ranges[layer]
    return f"'{layer}' [{lo:.4g}, {hi:.4g}]"


def _low_sqnr_message(where: str, db: float, floor: float, report: CompileReport,
                      ranges: dict[str, tuple[float, float]]) -> str:
    worst = _worst_layer(report.quantization.layers)
    parts = [f"int8 output SQNR against fp32 is {db:.1f} dB on {where}, below the floor of {floor:g} dB "
             f"(QuantConfig(min_sqnr_db=...))"]
    if worst is not None:
        own = worst.local_sqnr_db if worst.local_sqnr_db is not None else worst.sqnr_db
        parts.append(f"worst layer '{worst.layer}' ({worst.op}, {own:.1f} dB"
                     + (f", observer range {_range_text(ranges, worst.layer).split(' ', 1)[1]}"
                        if worst.layer in ranges else "") + ")")
    if ranges:
        widest = sorted(ranges, key=lambda k: -max(abs(ranges[k][0]), abs(ranges[k][1])))[:3]
        parts.append("widest observer ranges: " + ", ".join(_range_text(ranges, k) for k in widest))
    return "; ".join(parts) + (". Check the calibration data (one batch far out of range widens every range), or "
                               "keep the worst layers in fp32 with skip=[...] or accuracy=fxforge.AccuracyBudget(...)")


def int8_warnings(report: CompileReport, gm: fx.GraphModule, ctx: PassContext, quant: QuantOptions,
                  verify: str) -> None:
    """The int8 output against the floor, and observers that saw NaN / inf (see the module docstring)."""
    summary = report.quantization
    if summary is None or summary.model_sqnr_db is None:
        return
    observed = ctx.artifacts.get("observed_graph")
    bad = nonfinite_observers(observed) if observed is not None else []
    if bad:
        warn(report, f"{len(bad)} observer(s) saw NaN or inf values while calibrating (an overflow inside the "
                     f"model? their ranges leave those values out): {_listed(bad)}")
    measured = [("the example inputs", summary.model_sqnr_db)]
    sample = ctx.artifacts.get(CHECK_BATCH)
    if sample and observed is not None:
        db = _sample_sqnr(gm, observed, sample, quant.runtime_engine)
        if db is not None:
            measured.append(("the last calibration batch", db))
    where, db = min(measured, key=lambda m: _low(m[1]))
    floor = quant.config.min_sqnr_db
    if db >= floor:
        return
    message = _low_sqnr_message(where, db, floor, report,
                                observer_ranges(observed, quant) if observed is not None else {})
    if verify == "numeric":
        ran = [p.name for p in report.passes]
        raise NumericMismatchError(message, pass_name="calibrate" if "calibrate" in ran else ran[-1],
                                   ran_before=ran)
    warn(report, message)


def check(report: CompileReport, model: nn.Module, gm: fx.GraphModule, ctx: PassContext,
          quant: QuantOptions | None, verify: str) -> None:
    """Every check of this module on a finished compile."""
    if quant is not None:
        int8_warnings(report, gm, ctx, quant, verify)
    structure_warnings(report, model, gm)

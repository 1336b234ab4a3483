"""``compile(..., accuracy=fxforge.AccuracyBudget(...))``: int8 wherever the budget allows, fp32 where it must.

A budget is a minimum output SQNR against the fp32 model (``min_sqnr_db``, on ``inputs`` or the example
inputs), or a user metric of a module (``metric``, higher is better) with the largest acceptable drop from the
fp32 model's value (``max_drop``); with both, both must hold. The search:
1. compile as asked; if the budget holds, that is the result;
2. sensitivity: compile with *only* each candidate layer in int8 (the others in ``skip``) and measure; one
   layer at a time in int8 catches an outlier activation, quantized both as its producer's output and as its
   consumer's input, which skipping one layer at a time misses;
3. greedy: move layers to fp32 (``skip``), most damaging first, until the budget holds;
4. prune: try each chosen layer back in int8, least damaging first, keeping it there if the budget holds.
The result is a local minimum of fp32 layers. ``report.accuracy`` lists them, the sensitivities, the number of
compiles and a quick timing of the all-int8 and final models. Calibration data is read once into a list so
that every compile sees the same batches.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxforge.capture.signature import call_with
from fxforge.driver import health
from fxforge.driver.build import build
from fxforge.driver.compiled import CompiledModule
from fxforge.errors import AccuracyBudgetError, ConfigError
from fxforge.pipeline.report import AccuracyRecord, LayerSensitivity
from fxforge.progress import bar, enabled
from fxforge.quant.sqnr import outputs_sqnr_db

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccuracyBudget:
    """What the int8 model must keep: ``min_sqnr_db`` (output SQNR vs fp32) and/or ``metric`` + ``max_drop``.

    ``metric(module) -> float`` (higher is better, e.g. top-1 accuracy on held-out data) is called on the
    fp32 model once and on each candidate compiled model. ``inputs`` (a tensor, a tuple of forward
    arguments or a dict of keyword arguments) are what the SQNR is measured on (default: the example
    inputs). ``candidates`` restricts the layers that may move to fp32 (module paths; default: every
    quantized layer).
    """

    min_sqnr_db: float | None = None
    metric: Callable[[nn.Module], float] | None = None
    max_drop: float | None = None
    inputs: Any = None
    candidates: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.min_sqnr_db is None and self.metric is None:
            raise ConfigError("AccuracyBudget needs min_sqnr_db=<dB>, or metric=<callable(module) -> float> with "
                              "max_drop=<largest acceptable drop from the fp32 model's value>")
        if (self.metric is None) != (self.max_drop is None):
            raise ConfigError("AccuracyBudget: metric= and max_drop= go together (the metric of the fp32 model "
                              "minus that of the int8 one must be at most max_drop)")
        if self.metric is not None and not callable(self.metric):
            raise ConfigError(f"AccuracyBudget metric= must be callable(module) -> float, got {self.metric!r}")

    def describe(self) -> str:
        parts = [f"output SQNR >= {self.min_sqnr_db:g} dB"] if self.min_sqnr_db is not None else []
        if self.metric is not None:
            parts.append(f"{getattr(self.metric, '__name__', 'metric')} drop <= {self.max_drop:g}")
        return " and ".join(parts)


class _Judge:
    """Scores a compiled model against the budget; ``score`` is the metric when given, else the SQNR."""

    def __init__(self, budget: AccuracyBudget, model: nn.Module, inputs: Any) -> None:
        self.budget, self.inputs = budget, inputs
        with torch.no_grad():
            self.reference = call_with(model, inputs)
        self.baseline = float(budget.metric(model)) if budget.metric is not None else None
        self.measure = (f"{getattr(budget.metric, '__name__', 'metric')} (fp32: {self.baseline:.4g})"
                        if budget.metric is not None else "output SQNR dB")

    def measure_model(self, compiled: nn.Module) -> tuple[float, bool]:
        """(score, whether the budget holds)."""
        ok, score = True, None
        if self.budget.min_sqnr_db is not None:
            with torch.no_grad():
                score = outputs_sqnr_db(self.reference, call_with(compiled, self.inputs))
            ok = score >= self.budget.min_sqnr_db
        if self.budget.metric is not None:
            score = float(self.budget.metric(compiled))
            ok = ok and self.baseline - score <= self.budget.max_drop
        return score, ok


def materialize_calibration(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the calibration data read into a list (at most calibration_batches items)."""
    data, batches = options.get("calibration"), options.get("calibration_batches")
    if data is None or isinstance(data, (list, tuple, torch.Tensor)):
        return options
    return {**options, "calibration": list(itertools.islice(data, batches) if batches else data)}


def _candidates(compiled: nn.Module, model: nn.Module, budget: AccuracyBudget, skip: tuple[str, ...]) -> list[str]:
    """Quantized layers by module path, most specific only (a block holding candidate convs is not one)."""
    if budget.candidates is not None:
        return list(dict.fromkeys(budget.candidates))
    known = {name for name, _ in model.named_modules() if name}
    layers = [r.layer for r in compiled.report.quantization.layers if r.layer in known and r.layer not in skip]
    layers = list(dict.fromkeys(layers))
    return [name for name in layers if not any(other.startswith(name + ".") for other in layers)]


def _latency_ms(module: nn.Module, inputs: Any, runs: int = 10) -> float:
    with torch.inference_mode():
        call_with(module, inputs)  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call_with(module, inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class _Search:
    """The compiles of one budget run, counted."""

    def __init__(self, model: nn.Module, target: str, options: dict[str, Any], judge: _Judge) -> None:
        self.model, self.target, self.judge = model, target, judge
        self.options = {**options, "dump_dir": None, "instruments": (), "verify": "structure"}  # final compile only
        self.skip = tuple([options["skip"]] if isinstance(options["skip"], str) else options["skip"])
        self.compiles = 0

    def compile(self, fp32: Sequence[str]) -> tuple[CompiledModule, float, bool]:
        self.compiles += 1
        with enabled(False), health.deferred():  # the search's own bar says where it is; its warnings come once
            compiled = build(self.model, self.target, **{**self.options, "skip": (*self.skip, *fp32)})
        return (compiled, *self.judge.measure_model(compiled))


def _sensitivities(search: _Search, candidates: list[str]) -> list[LayerSensitivity]:
    """Most damaging first: each candidate alone in int8, the others in fp32."""
    scores = []
    with bar(candidates, desc="accuracy budget: sensitivity", unit="compile") as layers:
        for layer in layers:
            layers.set_postfix_str(layer, refresh=False)
            _, score, _ = search.compile([c for c in candidates if c != layer])
            log.debug("sensitivity of %s alone in int8: %.4g", layer, score)
            scores.append(LayerSensitivity(layer, score))
    return sorted(scores, key=lambda s: s.score)


def _choose(search: _Search, order: list[str]) -> list[str]:
    """Greedy (most damaging first) until the budget holds, then prune back to int8 what is not needed."""
    chosen: list[str] = []
    with bar(order, desc="accuracy budget: to fp32", unit="compile") as layers:
        for layer in layers:
            layers.set_postfix_str(layer, refresh=False)
            chosen.append(layer)
            if search.compile(chosen)[2]:
                break
        else:
            return []
    with bar(list(reversed(chosen[:-1])), desc="accuracy budget: pruning", unit="compile") as layers:
        for layer in layers:  # least damaging first; the last one added was needed
            layers.set_postfix_str(layer, refresh=False)
            trial = [c for c in chosen if c != layer]
            if search.compile(trial)[2]:
                chosen = trial
    return chosen


def compile_within_budget(model: nn.Module, target: str, budget: AccuracyBudget,
                          options: dict[str, Any]) -> CompiledModule:
    """``compile`` with ``options`` under ``budget`` (see the module docstring)."""
    if not isinstance(budget, AccuracyBudget):
        raise ConfigError(f"accuracy= takes an fxforge.AccuracyBudget, got {type(budget).__name__}")
    options = materialize_calibration(options)
    inputs = budget.inputs if budget.inputs is not None else options["example_inputs"]
    search = _Search(model, target, options, _Judge(budget, model, inputs))
    first, before, ok = search.compile([])
    if first.quant_options is None:
        raise ConfigError(f"accuracy= needs an int8 target (x86, fbgemm, qnnpack): '{first.target}' runs in fp32")
    chosen, sensitivity = [], []
    log.info("accuracy budget (%s): all-int8 score %.4g, %s", budget.describe(), before,
             "met" if ok else "not met: searching layers to keep in fp32")
    if not ok:
        candidates = _candidates(first, model, budget, search.skip)
        sensitivity = _sensitivities(search, candidates)
        chosen = _choose(search, [s.layer for s in sensitivity])
        if not chosen:
            raise AccuracyBudgetError(
                f"the budget ({budget.describe()}) does not hold even with all {len(candidates)} candidate layers "
                f"in fp32 (all-int8 score {before:.4g}; most sensitive: "
                f"{', '.join(f'{s.layer} {s.score:.4g}' for s in sensitivity[:5])}). Relax the budget, calibrate "
                f"with more representative data, choose other observers (quant_config), or train with prepare_qat")
    log.info("accuracy budget: %d layer(s) in fp32 after %d compiles: %s", len(chosen), search.compiles,
             ", ".join(chosen) or "none")
    plain = not options["dump_dir"] and not options["instruments"] and options["verify"] == "structure"
    final = first if plain and not chosen else build(model, target, **{**options, "skip": (*search.skip, *chosen)})
    if final is first:
        health.announce(final.report)
    after, met = search.judge.measure_model(final)
    final.report.accuracy = AccuracyRecord(
        requirement=budget.describe(), measure=search.judge.measure, before=before, after=after, met=met,
        fp32_layers=chosen, sensitivity=sensitivity, latency_ms_int8=_latency_ms(first, inputs),
        latency_ms_final=_latency_ms(final, inputs), compiles=search.compiles + (final is not first))
    return final

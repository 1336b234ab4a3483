"""``fxforge.compile``: one compile (``fxforge.driver.build``), or the searches over compiles that an accuracy
budget or the profitability check ask for (``fxforge.search``), each of which calls the driver per candidate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fxforge.capture.export import DynamicSpec
from fxforge.driver.build import build
from fxforge.driver.compiled import CompiledModule
from fxforge.pipeline.instruments import Instrument
from fxforge.progress import enabled
from fxforge.quant.config import QuantConfig
from fxforge.search.accuracy import AccuracyBudget, compile_within_budget, materialize_calibration
from fxforge.search.auto import compile_auto, quantization_asked
from fxforge.search.profitability import keep_profitable


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module,
    target: str = "auto",
    *,
    example_inputs: Any = None,
    pipeline: str | None = None,
    extra_passes: Mapping[str, Any] | None = None,
    verify: str = "structure",
    leaf_modules: Sequence[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    dump_dir: str | Path | None = None,
    instruments: Sequence[Instrument] = (),
    calibration: Any = None,
    calibration_batches: int | None = None,
    quantization: str | None = None,
    quant_config: QuantConfig | dict | None = None,
    skip: str | Sequence[str] = (),
    accuracy: AccuracyBudget | None = None,
    profitability: bool = False,
    progress: bool | None = None,
    capture: str = "auto",
    dynamic: DynamicSpec = None,
) -> CompiledModule:
    """Compile ``model`` for ``target`` and return a faster module with the same outputs.

    ``example_inputs`` (a tensor, a tuple of forward arguments, or a dict of keyword arguments as in
    ``model(**batch)``) fixes shapes for capture and shape propagation; ``capture`` picks the front end:
    "auto" (symbolic tracing, torch.export where tracing fails), "symbolic" or "export"; ``dynamic`` names
    the dimensions that may vary between calls: None (the default: batch and sequence where the model
    allows, see docs/capture.md), True (the batch and sequence dims of every input), False (none), or
    ``{"input_ids": {0: "batch", 1: "seq"}}``; calls outside them raise ``InputShapeError``. ``pipeline``
    replaces the target's pipeline text; ``extra_passes`` slots passes into it (``{"after:fold-bn": [my_pass],
    "end": "my-check"}``; anchors ``start``, ``end``, ``before:<pass>``, ``after:<pass>``); ``verify`` is
    "none", "structure" (lint + invariants after each pass) or "numeric" (also compares the output with
    eager after each pass). ``dump_dir`` writes the code and a .dot of the graph after every pass that
    changed it. ``accuracy`` (an ``fxforge.AccuracyBudget``,
    int8 targets) moves the most damaging layers to fp32 until the budget holds (``fxforge.search.accuracy``);
    ``profitability`` (static int8) keeps in fp32 the layers measured slower in int8 (``fxforge.search.profitability``).
    ``progress`` draws bars for the long steps (calibration, kernel timing, the searches): None (default) when
    stderr is a terminal, False never, True always. The model itself is never modified.
    """
    with enabled(progress):
        return _compile(model, target, accuracy=accuracy, profitability=profitability,
                        options=dict(example_inputs=example_inputs, pipeline=pipeline, extra_passes=extra_passes,
                                     verify=verify, leaf_modules=leaf_modules, concrete_args=concrete_args,
                                     dump_dir=dump_dir, instruments=instruments, calibration=calibration,
                                     calibration_batches=calibration_batches, quantization=quantization,
                                     quant_config=quant_config, skip=skip, capture=capture,
                                     dynamic=dynamic))


def _compile(model: nn.Module, target: str, *, accuracy: AccuracyBudget | None, profitability: bool,
             options: dict[str, Any]) -> CompiledModule:
    auto = None
    if target == "auto":
        options = materialize_calibration(options)  # every candidate sees the same batches
        target, compiled = compile_auto(model, options, quantization_asked(options, accuracy))
        auto = compiled.report.auto
    if accuracy is None and not profitability:
        return compiled if auto is not None else build(model, target, **options)
    options = materialize_calibration(options)  # every compile of the searches sees the same batches
    if accuracy is not None:
        compiled = compile_within_budget(model, target, accuracy, options)
    elif auto is None:
        compiled = build(model, target, **options)
    if profitability:
        compiled = keep_profitable(model, target, compiled, options)
    compiled.report.auto = auto
    return compiled

"""``compile(model, "auto", ...)``: the fastest target usable here that keeps the accuracy the user expects.

Candidates are the targets usable on this machine. Without a request for quantization they are the float targets
(``cpu``, ``cpu-bf16``, ``cuda``, ``openvino``, ...); with one (calibration data, ``quantization=``, ``quant_config=``,
``skip=`` or an accuracy budget) they are the int8 targets that have the asked mode, since that is what the user
asked for. Each candidate is
compiled and measured on the example inputs:
- accuracy: the output SQNR against the eager model; a reduced-precision float target (fp16 ``cuda``,
  ``cpu-bf16``) is accepted only when it reaches ``MIN_SQNR_DB``, fp32 targets always are (their build already
  compares them with eager), int8 targets are accepted as asked (the report shows their SQNR; an accuracy budget
  is then enforced on the chosen one);
- speed: the median of interleaved timed calls (``fxforge.numerics.timing``), GPU work synchronized in the call.
The first candidate's compile errors are raised (they are about the user's arguments: a model in training mode,
example inputs it does not take); a later candidate whose compile fails is recorded with its error and skipped.
The first accepted candidate in registration order (fp32 ``cpu`` before ``cpu-bf16``) is replaced by a later one
only when that one is faster by more than ``MARGIN``, so load noise does not trade accuracy for nothing. It is the
result; ``report.auto`` lists every candidate with its time, its SQNR and
why it was or was not taken.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fxforge.capture.signature import call_with
from fxforge.driver import health
from fxforge.driver.build import build
from fxforge.driver.compiled import CompiledModule
from fxforge.errors import BackendUnavailableError, CompileError
from fxforge.numerics import timing
from fxforge.pipeline.report import AutoCandidate, AutoChoice
from fxforge.pipeline.targets import Target, all_targets
from fxforge.progress import bar, enabled
from fxforge.quant.sqnr import outputs_sqnr_db

log = logging.getLogger(__name__)

# A reduced-precision float target must reproduce eager's output to this output SQNR (dB) on the example inputs:
# 40 dB is an error of 1% of the output's RMS, which fp16 clears on typical CNNs and bf16 (8 mantissa bits) often
# does not (docs/targets.md).
MIN_SQNR_DB = 40.0
MARGIN = 0.10
SCHEDULE = timing.Schedule(warmup=2, rounds=7, statistic=statistics.median)
QUANT_OPTIONS = ("calibration", "calibration_batches", "quantization", "quant_config")


@dataclass
class Trial:
    """One candidate compiled and measured (``compiled`` None: the compile failed with ``error``)."""

    target: Target
    compiled: CompiledModule | None = None
    seconds: float | None = None
    sqnr_db: float | None = None
    error: str | None = None


def quantization_asked(options: dict[str, Any], accuracy: Any) -> bool:
    """Whether the compile options ask for int8 (calibration data, a quantization mode or config, skip, a budget)."""
    return accuracy is not None or bool(options.get("skip")) or any(options.get(k) is not None for k in QUANT_OPTIONS)


def candidates(int8: bool, mode: str | None = None) -> list[Target]:
    """The usable targets of the asked kind: int8 ones when ``int8`` (those with quantization ``mode``: static
    when None), else the float ones."""
    return [t for t in all_targets().values() if t.availability() is None and (t.quant_backend is not None) == int8
            and (mode in (None, "static") or mode in t.mode_pipelines)]


def _on_device(value: Any, device: str) -> Any:
    return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


def _call(compiled: CompiledModule, inputs: Any, device: str) -> Callable[[], Any]:
    if device == "cuda":
        return lambda: (call_with(compiled, inputs), torch.cuda.synchronize())
    return lambda: call_with(compiled, inputs)


def run_trials(model: nn.Module, targets: list[Target], options: dict[str, Any]) -> list[Trial]:
    """Compile every target, measure its output SQNR against eager, then time the compiled ones interleaved."""
    trials, calls, reference = [], {}, None
    for target in (shown := bar(targets, desc="target auto: compiling", unit="target")):
        shown.set_postfix_str(target.name, refresh=False)
        trial = Trial(target)
        try:
            # auto's bar says which target it compiles; the chosen one's warnings are logged once it is chosen
            with enabled(False), health.deferred():
                trial.compiled = build(model, target.name, **options)
        except CompileError as exc:
            if not trials:  # the first candidate checks the user's arguments: its errors are theirs to see
                raise
            trial.error = f"{type(exc).__name__}: {exc}"
            log.warning("target auto: %s failed to compile and is skipped: %s", target.name, trial.error)
        if trial.compiled is not None:
            inputs = options["example_inputs"]
            if reference is None:
                with torch.inference_mode():
                    reference = call_with(model, inputs)
            here = _on_device(inputs, target.device)
            with torch.inference_mode():
                trial.sqnr_db = outputs_sqnr_db(reference, _on_device(call_with(trial.compiled, here), "cpu"))
            calls[target.name] = _call(trial.compiled, here, target.device)
        trials.append(trial)
    seconds = timing.measure(calls, SCHEDULE) if calls else {}
    for trial in trials:
        trial.seconds = seconds.get(trial.target.name)
    return trials


def _verdict(trial: Trial) -> tuple[bool, str]:
    """(accepted, why) for one trial."""
    if trial.compiled is None:
        return False, f"compile failed: {trial.error}"
    if trial.target.quant_backend is not None:
        return True, "int8, as asked"
    if trial.compiled.report.output_sqnr_db is None:  # the build records it for reduced-precision float graphs
        return True, "fp32"
    if not (trial.sqnr_db >= MIN_SQNR_DB):
        return False, f"output SQNR {trial.sqnr_db:.1f} dB is below the {MIN_SQNR_DB:g} dB floor"
    return True, f"reduced precision within the {MIN_SQNR_DB:g} dB floor"


def choose(trials: list[Trial]) -> tuple[Trial, AutoChoice]:
    """The fastest accepted trial and the record of the choice; BackendUnavailableError when none is accepted."""
    verdicts = [(trial, *_verdict(trial)) for trial in trials]
    accepted = [(trial, why) for trial, ok, why in verdicts if ok]
    if not accepted:
        raise BackendUnavailableError(
            "target='auto' found no usable target: " + "; ".join(f"{t.target.name}: {why}" for t, _, why in verdicts)
            + ". Pick a target by name (fxforge.targets() lists those usable here)")
    best, why = accepted[0]
    for trial, reason in accepted[1:]:
        if timing.clearly_faster(trial.seconds, best.seconds, MARGIN):
            best, why = trial, reason
    if len(accepted) == 1:
        reason = f"the only accepted target ({why})"
    elif best is accepted[0][0]:
        reason = f"{why}; no other accepted target is faster by more than {MARGIN:.0%}"
    else:
        reason = f"{why}; faster than {accepted[0][0].target.name} by more than {MARGIN:.0%}"
    record = AutoChoice(chosen=best.target.name, reason=reason, min_sqnr_db=MIN_SQNR_DB, candidates=[
        AutoCandidate(t.target.name, None if t.seconds is None else t.seconds * 1e3, t.sqnr_db, ok, why)
        for t, ok, why in verdicts])
    log.info("target auto chose %s: %s", best.target.name, reason)
    return best, record


def compile_auto(model: nn.Module, options: dict[str, Any], int8: bool) -> tuple[str, CompiledModule]:
    """(target name, compiled model) for ``target="auto"``; ``report.auto`` says why."""
    targets = candidates(int8, options.get("quantization"))
    if not targets:
        kind = "int8" if int8 else "float"
        raise BackendUnavailableError(f"target='auto' with{'' if int8 else 'out'} quantization options needs an "
                                      f"{kind} target, and none is usable here")
    best, record = choose(run_trials(model, targets, options))
    best.compiled.report.auto = record
    health.announce(best.compiled.report)
    return best.target.name, best.compiled

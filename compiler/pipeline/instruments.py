"""Instruments: hooks that run before and after every pass (timing, dumps, numeric checks).

They observe; they never print. Results go to the report, to files, or raise a typed error.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import fx

from fxforge.errors import NumericMismatchError
from fxforge.graph.snapshot import GraphStage, snapshot
from fxforge.numerics.metrics import max_errors
from fxforge.quant.observers import observers_paused
from fxforge.quant.sqnr import outputs_sqnr_db

from .context import PassContext
from .pass_api import Pass, PassResult
from .renderers import dot_writer
from .report import PassRecord


class Instrument:
    """Base instrument: override either hook. ``ran_before`` lists the specs of the passes already run."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, ran_before: list[str]) -> None:
        pass


def count_nodes(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


class TimingInstrument(Instrument):
    """Per-pass wall time and node counts, appended to ``ctx.report.passes``."""

    def __init__(self) -> None:
        self._start = 0.0
        self._nodes_before = 0

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        self._nodes_before = count_nodes(gm)
        self._start = time.perf_counter()

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, ran_before: list[str]) -> None:
        seconds = time.perf_counter() - self._start
        ctx.report.passes.append(
            PassRecord(p.name, str(p.spec()), seconds, self._nodes_before, count_nodes(result.gm),
                       result.modified, list(result.notes), dict(result.matches))
        )


class GraphSnapshots(Instrument):
    """Keep a plain-data snapshot of the traced graph and of the graph after every pass that changed it in
    ``ctx.report.stages``, for ``fxforge.viz`` (render, diff) and the HTML report. Costs a walk over the nodes
    per changing pass (no tensors are copied)."""

    def __init__(self) -> None:
        self._index = 0

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self._index == 0 and not ctx.report.stages:
            ctx.report.stages.append(GraphStage("trace", 0, snapshot(gm, "traced")))

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, ran_before: list[str]) -> None:
        self._index += 1
        if result.modified:
            spec = str(p.spec())
            ctx.report.stages.append(GraphStage(spec, self._index, snapshot(result.gm, f"after {spec}")))


class DumpAfterChange(Instrument):
    """Write the code and a Graphviz ``.dot`` of the graph after every pass that changed it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._index = 0
        self._to_dot = dot_writer()  # fails here, before any pass ran, when fxforge.viz is not loaded

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, ran_before: list[str]) -> None:
        self._index += 1
        if not result.modified:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / f"{self._index:02d}-{p.name}"
        stem.with_suffix(".py").write_text(result.gm.code)
        stem.with_suffix(".dot").write_text(self._to_dot(result.gm, f"after {p.spec()}"))


class NumericCheck(Instrument):
    """Re-run the example inputs after every changing pass; fail on the first pass that moves the output."""

    def __init__(self, rtol: float = 1e-4, min_sqnr_db: float = 15.0) -> None:
        self.rtol = rtol
        self.min_sqnr_db = min_sqnr_db  # once the graph is int8 ("quantized"), outputs are compared by SQNR

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, ran_before: list[str]) -> None:
        if not result.modified or ctx.reference_outputs is None:
            return

        try:
            with torch.inference_mode(), observers_paused():  # example inputs are not calibration data
                self._outputs = result.gm(*ctx.fresh_inputs())
                abs_err, rel_err = max_errors(self._outputs, ctx.reference_outputs)
        except Exception as exc:
            raise NumericMismatchError(
                f"after pass '{p.spec()}' the model no longer runs on the example inputs: "
                f"{type(exc).__name__}: {exc}. Passes before it: {', '.join(ran_before) or 'none'}.",
                pass_name=p.name, ran_before=ran_before) from exc
        # int8 and fp16/bf16 graphs ("reduced-precision") are compared by SQNR, not a relative tolerance
        if {"quantized", "reduced-precision"} & (ctx.properties | p.provides):
            self._check_sqnr(p, result, ctx, ran_before)
        elif not rel_err <= self.rtol:  # NaN fails
            raise NumericMismatchError(
                f"pass '{p.spec()}' changed the model output: max abs error {abs_err:.3g}, relative {rel_err:.3g} "
                f"(tolerance {self.rtol:g}). Passes before it: {', '.join(ran_before) or 'none'}. "
                f"Run without it (pipeline=...) and report a bug with the model.",
                pass_name=p.name, ran_before=ran_before,
            )

    def _check_sqnr(self, p: Pass, result: PassResult, ctx: PassContext, ran_before: list[str]) -> None:
        sqnr = outputs_sqnr_db(ctx.reference_outputs, self._outputs)
        if not sqnr >= self.min_sqnr_db:  # NaN fails
            raise NumericMismatchError(
                f"after pass '{p.spec()}' the int8 / reduced-precision model's output SQNR against fp32 is "
                f"{sqnr:.1f} dB (minimum "
                f"{self.min_sqnr_db:g}). Passes before it: {', '.join(ran_before) or 'none'}. The report's "
                f"per-layer SQNR shows the layers that lose the most: skip=[...] keeps them in fp32.",
                pass_name=p.name, ran_before=ran_before)

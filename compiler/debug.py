"""``fxforge.debug``: find where a compiled model loses accuracy.

- ``compare(model, compiled, inputs)``: every value of the compiled graph against the fp32 model's, keyed
  by the traced node and its module path: accumulated SQNR, the SQNR this op *adds* (the fp32 op run on
  the compiled graph's own inputs, see ``fxforge.numerics.provenance``) and the max abs error; most damaging first.
  The table is printable and goes into ``compiled.report`` (``report.comparison``).
- ``bisect(model, target, inputs)``: runs the target's pipeline pass by pass; after each pass the output is
  checked against fp32 with the tolerance that pass should keep (fp32 passes: ``rtol`` relative error;
  once the graph is quantized: an SQNR floor, and at most ``max_drop_db`` lost by any later pass). The
  first pass that departs is named, with the first node (graph order) whose own error exceeds that tolerance.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxforge.capture.front_end import capture as capture_model
from fxforge.capture.signature import graph_inputs
from fxforge.driver.build import check_eval, prepare
from fxforge.driver.compiled import CompiledModule
from fxforge.driver.qat import convert_qat_layers
from fxforge.graph.meta import fxmeta
from fxforge.numerics.metrics import max_errors
from fxforge.numerics.provenance import ValueErrors, accumulated_errors, capture, local_errors, value_keys
from fxforge.pipeline.instruments import TimingInstrument
from fxforge.pipeline.manager import PassManager
from fxforge.pipeline.report import LayerComparison, LayerError
from fxforge.quant.config import layer_name
from fxforge.quant.observers import Observer
from fxforge.quant.qspec import quantized_engine
from fxforge.quant.sqnr import outputs_sqnr_db

from .errors import CompileError, ConfigError

__all__ = ["BisectResult", "BisectStage", "bisect", "compare"]


def _finite(db: float) -> float:
    return 999.0 if db == math.inf else (-999.0 if db == -math.inf else db)


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "placeholder":
        return "input"
    return str(getattr(node.target, "__name__", node.target))


def _describe(inputs: tuple) -> str:
    return ", ".join("x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else repr(x) for x in inputs)


def _engine(compiled: CompiledModule) -> str | None:
    return compiled.quant_options.runtime_engine if compiled.quant_options is not None else None


def reference_graph(model: nn.Module, compiled: CompiledModule, inputs: Any) -> fx.GraphModule:
    """The fp32 model captured as compile captured it (same front end, same node names); ``inputs`` in any
    form compile accepts."""
    options = getattr(compiled, "trace_options", None) or {}
    work = copy.deepcopy(model)
    convert_qat_layers(work)
    return capture_model(work, inputs, mode=compiled.report.front_end, leaf_modules=options.get("leaf_modules", ()),
                         concrete_args=options.get("concrete_args")).gm


def _row(gm: fx.GraphModule, by_name: dict[str, fx.Node], key: str, compiled_node: fx.Node, total: ValueErrors,
         own: ValueErrors | None) -> LayerError:
    """A table row; a fused region (conv+bn+relu) is named by its first module and all its ops."""
    region = [by_name[o] for o in fxmeta(compiled_node).get("origins", [key]) if o in by_name] or [by_name[key]]
    layer = "<input>" if region[0].op == "placeholder" else layer_name(region[0])
    op = "+".join(dict.fromkeys(_op_name(gm, n) for n in region))
    return LayerError(layer=layer, node=key, op=op, compiled_node=compiled_node.name,
                      sqnr_db=_finite(total.sqnr_db), local_sqnr_db=None if own is None else _finite(own.sqnr_db),
                      max_abs_error=total.max_abs_error)


def _damage(row: LayerError) -> tuple:
    """Sort key: lowest local SQNR first; values without one last, by accumulated SQNR."""
    return (row.local_sqnr_db is None, row.local_sqnr_db if row.local_sqnr_db is not None else 0.0,
            row.sqnr_db if row.sqnr_db is not None else 0.0)


def compare(model: nn.Module, compiled: CompiledModule, inputs: Any, *, attach: bool = True) -> LayerComparison:
    """Per-value error of ``compiled`` against ``model`` (fp32) on ``inputs`` (a tensor, a tuple of forward
    arguments or a dict of keyword arguments, as compile takes; a few samples suffice), most damaging first.
    ``attach``: also store it as ``compiled.report.comparison``, printed with the report."""
    check_eval(model)
    if not isinstance(compiled, CompiledModule):
        raise ConfigError(f"compare takes the module fxforge.compile returned, got {type(compiled).__name__}")
    ref_gm = reference_graph(model, compiled, inputs)
    inputs = graph_inputs(compiled.signature, inputs)
    with quantized_engine(_engine(compiled)), torch.no_grad():
        values, nodes = capture(compiled.graph_module, inputs)
        total = accumulated_errors(ref_gm, inputs, values)
        own = local_errors(ref_gm, inputs, values)
        output_sqnr = outputs_sqnr_db(ref_gm(*inputs), compiled.graph_module(*inputs))
    by_name = {n.name: n for n in ref_gm.graph.nodes}
    rows = [_row(ref_gm, by_name, key, nodes[key], err, own.get(key)) for key, err in total.items()]
    table = LayerComparison(_describe(inputs), _finite(output_sqnr), sorted(rows, key=_damage))
    if attach:
        compiled.report.comparison = table
    return table


@dataclass
class BisectStage:
    """The check after one pass: ``value`` (relative error or SQNR dB) against its ``limit``."""

    index: int
    spec: str
    check: str  # "rel err <=", "SQNR dB >=" or "failed"
    value: float
    limit: float
    ok: bool


@dataclass
class BisectResult:
    """The first pass whose output departs from fp32 beyond its tolerance (None: every pass kept it)."""

    pipeline: str
    stages: list[BisectStage] = field(default_factory=list)
    pass_spec: str | None = None
    pass_index: int | None = None
    node: str | None = None  # the node (in the graph after that pass) where the departure starts
    layer: str | None = None  # its module path
    detail: str = ""

    @property
    def found(self) -> bool:
        return self.pass_spec is not None

    @property
    def pass_name(self) -> str | None:
        return None if self.pass_spec is None else self.pass_spec.split("{")[0]

    def __str__(self) -> str:
        lines = [f"bisect of {self.pipeline}"]
        lines += [f"  {s.index:>2} {s.spec:<40}{s.check:>11} {s.value:>10.4g} (limit {s.limit:.4g})  "
                  f"{'ok' if s.ok else 'DEPARTS'}" for s in self.stages]
        if not self.found:
            lines.append("every pass kept the output within its tolerance")
        else:
            lines.append(f"first departing pass: #{self.pass_index} '{self.pass_spec}', at node '{self.node}' "
                         f"(module '{self.layer or '<root>'}'): {self.detail}")
        return "\n".join(lines)


def _run(gm: fx.GraphModule, inputs: tuple, engine: str | None) -> Any:
    """``gm``'s outputs; a graph with observers runs as a copy (observers record every call, and the checks
    must not add the example inputs to the calibration statistics)."""
    if any(isinstance(m, Observer) for m in gm.modules()):
        gm = copy.deepcopy(gm)
    with quantized_engine(engine), torch.inference_mode():
        return gm(*inputs)


@dataclass
class _Tolerance:
    rtol: float
    min_sqnr_db: float
    max_drop_db: float
    best_sqnr: float | None = None  # the SQNR right after the graph became quantized

    def check(self, index: int, spec: str, outputs: Any, reference: Any, quantized: bool) -> BisectStage:
        if not quantized:
            rel = max_errors(outputs, reference)[1]
            return BisectStage(index, spec, "rel err <=", rel, self.rtol, rel <= self.rtol)
        sqnr = _finite(outputs_sqnr_db(reference, outputs))
        limit = self.min_sqnr_db if self.best_sqnr is None else max(self.min_sqnr_db, self.best_sqnr - self.max_drop_db)
        self.best_sqnr = sqnr if self.best_sqnr is None else max(self.best_sqnr, sqnr)
        return BisectStage(index, spec, "SQNR dB >=", sqnr, limit, sqnr >= limit)

    def departs(self, err: ValueErrors, quantized: bool) -> bool:
        return not (err.sqnr_db >= self.min_sqnr_db if quantized else err.max_rel_error <= self.rtol)  # NaN departs


def _localize(before: fx.GraphModule, keys: dict[str, str], after: fx.GraphModule, inputs: tuple,
              engine: str | None, tol: _Tolerance, quantized: bool) -> tuple[str, str, str]:
    """(node, module path, detail) of the first value (graph order) whose own error breaks the tolerance,
    else of the value with the largest own error."""
    with quantized_engine(engine), torch.no_grad():
        values, nodes = capture(after, inputs)
        own = local_errors(before, inputs, values, keys)
    order = [keys[n.name] for n in before.graph.nodes if keys.get(n.name) in own]
    if not order:
        return "?", "", "no value of the graph before this pass survives in the graph after it"
    culprit = next((k for k in order if tol.departs(own[k], quantized)), None)
    why = "first value whose own error exceeds the tolerance"
    if culprit is None:
        culprit = min(order, key=lambda k: own[k].sqnr_db)
        why = "no single value exceeds the tolerance; the value with the largest own error"
    err, node = own[culprit], nodes[culprit]
    return node.name, layer_name(node), (f"{why}: its own SQNR {_finite(err.sqnr_db):.1f} dB, relative error "
                                         f"{err.max_rel_error:.3g} (traced value '{culprit}')")


def bisect(model: nn.Module, target: str, inputs: Any, *, pipeline: str | None = None, rtol: float = 1e-4,
           min_sqnr_db: float = 20.0, max_drop_db: float = 3.0, leaf_modules: Sequence[str | type] = (),
           concrete_args: dict[str, Any] | None = None, calibration: Any = None,
           calibration_batches: int | None = None, quantization: str | None = None, quant_config: Any = None,
           skip: str | Sequence[str] = ()) -> BisectResult:
    """Run ``target``'s pipeline (or ``pipeline``) one pass at a time on ``inputs`` and name the first pass,
    and node, where the output departs from fp32 beyond its tolerance (see the module docstring). The
    other arguments are compile's."""
    session = prepare(model, target, example_inputs=inputs, pipeline=pipeline, verify="structure",
                      leaf_modules=leaf_modules, concrete_args=concrete_args, calibration=calibration,
                      calibration_batches=calibration_batches, quantization=quantization, quant_config=quant_config,
                      skip=skip, start=time.perf_counter())
    gm, ctx = session.gm, session.ctx
    engine = session.quant.runtime_engine if session.quant else None
    tol, result = _Tolerance(rtol, min_sqnr_db, max_drop_db), BisectResult(session.manager.pipeline)
    for index, p in enumerate(session.manager.passes):
        spec = str(p.spec())
        before, keys = copy.deepcopy(gm), value_keys(gm)
        try:
            gm = PassManager([p], [TimingInstrument()], verify=True).run(gm, ctx)
            outputs = _run(gm, ctx.fresh_inputs(), engine)
        except (CompileError, RuntimeError, TypeError, ValueError) as exc:
            result.stages.append(BisectStage(index, spec, "failed", math.nan, math.nan, False))
            result.pass_spec, result.pass_index, result.detail = spec, index, f"{type(exc).__name__}: {exc}"
            return result
        quantized = "quantized" in ctx.properties
        stage = tol.check(index, spec, outputs, ctx.reference_outputs, quantized)
        result.stages.append(stage)
        if not stage.ok:
            result.pass_spec, result.pass_index = spec, index
            result.node, result.layer, result.detail = _localize(before, keys, gm, ctx.fresh_inputs(), engine, tol,
                                                                 quantized)
            return result
    return result

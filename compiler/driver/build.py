"""Compile once (``build``): trace, run the target's pipeline, return a CompiledModule with its report.

``fxforge.compile`` calls it, or the searches above it do (``fxforge.search``), once per candidate.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from fxforge.capture.export import DynamicSpec
from fxforge.capture.front_end import capture as capture_model
from fxforge.capture.signature import CallSignature
from fxforge.errors import CalibrationError, CompileError, ConfigError
from fxforge.numerics.metrics import max_errors
from fxforge.numerics.precision import exact_fp32
from fxforge.pipeline.composition import insert_passes
from fxforge.pipeline.context import PassContext, clone_inputs
from fxforge.pipeline.instruments import DumpAfterChange, GraphSnapshots, Instrument, NumericCheck, TimingInstrument
from fxforge.pipeline.manager import PassManager
from fxforge.pipeline.report import CompileReport
from fxforge.pipeline.targets import Target, resolve_target
from fxforge.quant.config import QuantConfig, QuantOptions, check_skip_names
from fxforge.quant.qat_modules import FakeQuantize
from fxforge.quant.qspec import quantized_engine
from fxforge.quant.sqnr import outputs_sqnr_db

from . import health
from .compiled import CompiledModule
from .inputs import check_inputs, check_model, copy_model, input_specs
from .qat import convert_qat_layers

VERIFY_MODES = ("none", "structure", "numeric")


def check_eval(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile expects an nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ConfigError(
            f"the model is in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}): "
            f"call model.eval() before compiling (fxforge compiles for inference)"
        )


def _to_device(value: Any, device: str) -> Any:
    """Every tensor in ``value`` (a tensor, tuple, list or dict of them) on ``device``."""
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


def _reference_outputs(ctx: PassContext, gm: fx.GraphModule) -> Any:
    """The traced model's outputs on the example inputs (recording shapes); failing there means the example
    inputs do not fit the model. (ShapeProp prints the traceback it chains: kept off stderr on failure.)"""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), exact_fp32():  # not TF32, torch's default for GPU convs
            outputs = ctx.propagate(gm)
    except Exception as exc:
        cause = exc.__cause__ or exc
        first = (str(cause).strip().splitlines() or [""])[0]
        raise ConfigError(f"the model fails on example_inputs with {type(cause).__name__}: {first}. Pass example "
                          f"inputs that its forward accepts: one value per argument, shaped and typed like real "
                          f"data (e.g. one real batch)") from cause
    sys.stderr.write(printed.getvalue())  # warnings printed on success are the user's to see
    return outputs


QUANT_MODES = ("static", "dynamic", "weight-only")
def _has_trained_fake_quants(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuantize) and m.batches_seen > 0 for m in model.modules())


def _quant_options(model: nn.Module, tgt: Target, quantization: str | None, quant_config: Any,
                   skip: str | Sequence[str], calibration: Any, calibration_batches: int | None) -> QuantOptions | None:
    """Validate the quantization arguments against the target; None for fp32 targets."""
    given = (quantization is not None or quant_config is not None or skip or calibration is not None
             or calibration_batches is not None)
    if tgt.quant_backend is None:
        if given:
            raise ConfigError(f"target '{tgt.name}' runs in fp32; quantization, quant_config, skip, calibration and "
                              f"calibration_batches need an int8 target: x86, fbgemm or qnnpack")
        return None
    mode = quantization or "static"
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantization={mode!r}: choose one of {', '.join(QUANT_MODES)}")
    if mode != "static" and (calibration is not None or calibration_batches is not None):
        raise ConfigError(f"quantization={mode!r} takes no calibration data (activations are "
                          f"{'quantized per call' if mode == 'dynamic' else 'kept in fp32'}): drop calibration=, "
                          f"or use quantization='static'")
    if mode == "static" and calibration is None and not _has_trained_fake_quants(model):
        raise CalibrationError(
            f"target '{tgt.name}' quantizes activations statically and needs calibration data: pass "
            f"calibration=<iterable of model inputs> (e.g. 8-32 batches of real data), or use "
            f"quantization='dynamic' (weights int8, activations quantized per call: no calibration needed)")
    skip = check_skip_names(model, skip)
    return QuantOptions(mode=mode, backend=tgt.quant_backend, config=QuantConfig.from_value(quant_config),
                        skip=skip, calibration=calibration, calibration_batches=calibration_batches,
                        engine=tgt.quantized_engine if mode == "static" else None)  # only static fuses conv+add


@dataclass
class Session:
    """A compile up to the pass pipeline: the resolved target, the traced graph, its context and report."""

    target: Target
    quant: QuantOptions | None
    inputs: tuple[Any, ...]
    manager: PassManager
    gm: fx.GraphModule
    ctx: PassContext
    report: CompileReport
    signature: CallSignature | None = None  # how user calls map onto the graph's inputs


def prepare(model: nn.Module, target: str, *, example_inputs: Any, pipeline: str | None, verify: str,
            leaf_modules: Sequence[str | type], concrete_args: dict[str, Any] | None, calibration: Any,
            calibration_batches: int | None, quantization: str | None, quant_config: Any,
            skip: str | Sequence[str], start: float, extra_passes: Mapping[str, Any] | None = None,
            capture: str = "auto", dynamic: DynamicSpec = None) -> Session:
    """Check the arguments, capture a copy of ``model`` and record the eager reference (compile, bisect)."""
    check_eval(model)
    check_model(model)
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify={verify!r}: choose one of {', '.join(VERIFY_MODES)}")
    tgt = resolve_target(target)
    quant = _quant_options(model, tgt, quantization, quant_config, skip, calibration, calibration_batches)
    if example_inputs is not None:
        check_inputs(tuple(tree_leaves(example_inputs)))
    example_inputs = _to_device(example_inputs, tgt.device)
    default_pipeline = tgt.pipeline_for_mode(quant.mode if quant else None)
    manager = PassManager.from_text(pipeline if pipeline is not None else default_pipeline, verify=verify != "none")
    if extra_passes:
        manager.passes = insert_passes(manager.passes, extra_passes)
    manager.check({"eval"})  # a pass whose requirements cannot hold fails here, before tracing

    work = copy_model(model).to(tgt.device)  # never touch the user's model
    convert_qat_layers(work)  # a model trained with prepare_qat: plain layers, its fake-quants stay
    captured = capture_model(work, example_inputs, mode=capture, dynamic=dynamic, leaf_modules=leaf_modules,
                             concrete_args=concrete_args)
    report = CompileReport(tgt.name, manager.pipeline, torch.__version__,
                           leaf_modules=captured.leaf_modules,
                           bound_arguments={k: repr(v) for k, v in captured.bound_arguments.items()},
                           trace_seconds=time.perf_counter() - start, front_end=captured.front_end,
                           front_end_reason=captured.reason, input_shapes=captured.signature.specialized)
    inputs = captured.inputs
    ctx = PassContext(inputs, report, target=tgt.name, properties={"eval"}, quant=quant,
                      signature=captured.signature)
    ctx.reference_outputs = _reference_outputs(ctx, captured.gm)  # the eager reference, and shapes in node.meta
    return Session(tgt, quant, inputs, manager, captured.gm, ctx, report, captured.signature)


def build(
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
    capture: str = "auto",
    dynamic: DynamicSpec = None,
) -> CompiledModule:
    """Compile ``model`` for ``target`` once: ``fxforge.compile`` without its searches (``accuracy``,
    ``profitability``); see there for the options."""
    start = time.perf_counter()
    session = prepare(model, target, example_inputs=example_inputs, pipeline=pipeline, verify=verify,
                      leaf_modules=leaf_modules, concrete_args=concrete_args, calibration=calibration,
                      calibration_batches=calibration_batches, quantization=quantization, quant_config=quant_config,
                      skip=skip, start=start, extra_passes=extra_passes, capture=capture, dynamic=dynamic)
    tgt, quant, inputs, manager, ctx, report = (session.target, session.quant, session.inputs, session.manager,
                                                session.ctx, session.report)
    manager.instruments = [TimingInstrument(), GraphSnapshots(), *instruments]
    if dump_dir is not None:
        manager.instruments.append(DumpAfterChange(dump_dir))
    if verify == "numeric":
        manager.instruments.append(NumericCheck())
    engine = quant.runtime_engine if quant else None  # passes and checks run the graph as forward() will
    with quantized_engine(engine), exact_fp32():  # numeric checks compare with the exact fp32 reference
        gm = manager.run(session.gm, ctx)

    try:
        with torch.inference_mode(), quantized_engine(engine), exact_fp32():
            outputs = gm(*clone_inputs(inputs))
            report.max_abs_error, report.max_rel_error = max_errors(outputs, ctx.reference_outputs)
    except Exception as exc:  # the compiled graph verified but does not run: say how to find the culprit
        raise CompileError(
            f"the compiled model failed on the example inputs with {type(exc).__name__}: {exc}. Compile with "
            f"verify='numeric' to find the pass that broke it (pipeline: {manager.pipeline})") from exc
    if "reduced-precision" in ctx.properties and report.quantization is None:  # e.g. cpu-bf16
        report.output_sqnr_db = outputs_sqnr_db(ctx.reference_outputs, outputs)
    if report.quantization is not None:
        report.quantization.model_sqnr_db = outputs_sqnr_db(ctx.reference_outputs, outputs)
        if _has_trained_fake_quants(model):
            report.quantization.reference = "the QAT model in eval mode (fake-quantized activations)"
    health.check(report, model, gm, ctx, quant, verify)  # warns of what makes it worse than it looks
    report.compile_seconds = time.perf_counter() - start
    compiled = CompiledModule(gm, tgt.name, manager.pipeline, report, ctx.artifacts.get("observed_graph"), quant,
                              session.signature)
    # how the model was traced: fxforge.debug.compare traces it again the same way
    compiled.__dict__["trace_options"] = {"leaf_modules": tuple(leaf_modules), "concrete_args": concrete_args}
    compiled.__dict__["input_specs"] = input_specs(inputs)
    return compiled

"""``fxforge.compile``: trace, run the target's pipeline, return a CompiledModule with its report."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .context import PassContext, clone_inputs
from .errors import CompileError, ConfigError
from .instruments import DumpAfterChange, Instrument, NumericCheck, TimingInstrument
from .numerics import max_errors
from .pass_manager import PassManager
from .report import CompileReport
from .targets import resolve_target
from .tracing import trace

VERIFY_MODES = ("none", "structure", "numeric")


class CompiledModule(nn.Module):
    """The compiled model: an nn.Module that runs the lowered graph under ``torch.inference_mode``."""

    def __init__(self, graph_module: fx.GraphModule, target: str, pipeline: str, report: CompileReport) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.target = target
        self.pipeline = pipeline
        self.report = report

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.graph_module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, pipeline={self.pipeline!r}"


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        raise ConfigError("compile needs example_inputs=: a tensor, or a tuple with one value per forward argument")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _check_eval(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile expects an nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ConfigError(
            f"the model is in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}): "
            f"call model.eval() before compiling (fxforge compiles for inference)"
        )


def _to_device(value: Any, device: str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module,
    target: str = "auto",
    *,
    example_inputs: Any = None,
    pipeline: str | None = None,
    verify: str = "structure",
    leaf_modules: Sequence[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    dump_dir: str | Path | None = None,
    instruments: Sequence[Instrument] = (),
) -> CompiledModule:
    """Compile ``model`` for ``target`` and return a faster module with the same outputs.

    ``example_inputs`` (a tensor or tuple) fixes shapes for tracing and shape propagation; ``pipeline``
    replaces the target's pipeline text; ``verify`` is "none", "structure" (lint + invariants after each
    pass) or "numeric" (also compares the output with eager after each pass). ``dump_dir`` writes the code
    and a .dot of the graph after every pass that changed it. The model itself is never modified.
    """
    start = time.perf_counter()
    _check_eval(model)
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify={verify!r}: choose one of {', '.join(VERIFY_MODES)}")
    tgt = resolve_target(target)
    inputs = tuple(_to_device(x, tgt.device) for x in _as_tuple(example_inputs))
    manager = PassManager.from_text(pipeline if pipeline is not None else tgt.pipeline, verify=verify != "none")

    work = copy.deepcopy(model).to(tgt.device)  # never touch the user's model
    traced = trace(work, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    report = CompileReport(tgt.name, manager.pipeline, torch.__version__,
                           leaf_modules=traced.leaf_modules,
                           bound_arguments={k: repr(v) for k, v in traced.bound_arguments.items()},
                           trace_seconds=time.perf_counter() - start)
    ctx = PassContext(inputs, report, target=tgt.name, properties={"eval"})
    ctx.reference_outputs = ctx.propagate(traced.gm)  # the eager reference, and shapes in node.meta

    manager.instruments = [TimingInstrument(), *instruments]
    if dump_dir is not None:
        manager.instruments.append(DumpAfterChange(dump_dir))
    if verify == "numeric":
        manager.instruments.append(NumericCheck())
    gm = manager.run(traced.gm, ctx)

    try:
        with torch.inference_mode():
            report.max_abs_error, report.max_rel_error = max_errors(gm(*clone_inputs(inputs)), ctx.reference_outputs)
    except Exception as exc:  # the compiled graph verified but does not run: say how to find the culprit
        raise CompileError(
            f"the compiled model failed on the example inputs with {type(exc).__name__}: {exc}. Compile with "
            f"verify='numeric' to find the pass that broke it (pipeline: {manager.pipeline})") from exc
    report.compile_seconds = time.perf_counter() - start
    return CompiledModule(gm, tgt.name, manager.pipeline, report)

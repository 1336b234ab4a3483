"""``CompiledModule``: what ``fxforge.compile`` returns, the lowered graph with its target, pipeline and report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxforge.capture.signature import CallSignature
from fxforge.pipeline.report import CompileReport
from fxforge.quant.config import QuantOptions
from fxforge.quant.qspec import quantized_engine
from fxforge.serialization.deploy import export
from fxforge.serialization.torchscript import to_torchscript

from .inputs import explain_call_failure


class CompiledModule(nn.Module):
    """The compiled model: an nn.Module that runs the lowered graph under ``torch.inference_mode``."""

    def __init__(self, graph_module: fx.GraphModule, target: str, pipeline: str, report: CompileReport,
                 observed_graph: fx.GraphModule | None = None, quant: QuantOptions | None = None,
                 signature: CallSignature | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.target = target
        self.pipeline = pipeline
        self.report = report
        # Static int8: the fp32 graph with its observers, kept (not a submodule) for fxforge.recalibrate.
        self.__dict__["observed_graph"] = observed_graph
        self.__dict__["quant_options"] = quant
        # the example inputs' dtypes / shapes / devices, to explain a failed call (fxforge.driver.inputs)
        self.__dict__["input_specs"] = None
        # how calls map onto the graph's inputs and back to the model's output structure (None: as they are)
        self.__dict__["signature"] = signature

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the graph; with a signature, checks the inputs against the compiled shapes (InputShapeError)
        and returns the model's output structure (ModelOutput, dict, tuple)."""
        signature = self.signature
        if signature is not None:
            args, kwargs = tuple(signature.flatten(args, kwargs)), {}
        try:
            if self.quant_options is None:  # fp32: nothing else on the per-call path
                with torch.inference_mode():
                    outputs = self.graph_module(*args, **kwargs)
            else:  # int8 ops without prepacked weights follow the process-wide engine: pin the one we compiled for
                with torch.inference_mode(), quantized_engine(self.quant_options.runtime_engine):
                    outputs = self.graph_module(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:  # a kernel's raw message: were the inputs unlike?
            explained = explain_call_failure(self.__dict__.get("input_specs"), args, exc)
            if explained is None:
                raise
            raise explained from exc
        return outputs if signature is None else signature.unflatten(outputs)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, pipeline={self.pipeline!r}"

    def to_torchscript(self, example_inputs: Any = None) -> torch.jit.ScriptModule:
        """The lowered graph as TorchScript for serving stacks (``fxforge.serialization.torchscript``);
        ``example_inputs`` default to random tensors of the compiled shapes."""
        return to_torchscript(self, example_inputs)

    def export(self, path: str | Path, format: str | None = None, **options: Any) -> Path:
        """Write the compiled model to run without fxforge (``fxforge.serialization.deploy``): ``"pt2"`` (``.pt2``,
        a torch.export program, bit-identical), ``"aoti"`` (``.aoti.pt2``, an AOTInductor package) or ``"onnx"``
        (``.onnx``); the format comes from ``format`` or else the file name. Options: ``example_inputs``,
        ``dynamic`` (every format); ``opset`` (onnx)."""
        return export(self, path, format, **options)

"""fxforge: a torch.fx compiler for PyTorch models. ``fxforge.compile(model, target, example_inputs=...)``."""

from __future__ import annotations

from . import debug, numerics, patterns, testing  # noqa: F401  (fxforge.debug / .numerics / .patterns / .testing)
from .accuracy import AccuracyBudget
from .artifact import load, read_metadata, save
from .compile import CompiledModule, compile
from .context import PassContext
from .errors import (
    AccuracyBudgetError,
    ArtifactError,
    BackendUnavailableError,
    CalibrationError,
    CompileError,
    ConfigError,
    NumericMismatchError,
    PassError,
    PluginWarning,
    TraceError,
    UnsupportedOpError,
)
from .instruments import DumpAfterChange, Instrument, NumericCheck, TimingInstrument
from .pass_api import Pass, PassResult, graph_pass, register_pass, registered_passes
from .pass_manager import PassManager
from .pipeline import PassSpec, format_pipeline, parse_pipeline
from .quant.calibration import recalibrate
from .quant.config import QuantConfig
from .quant.qat import prepare_qat
from .report import CompileReport
from .targets import Target, pipeline_for, register_target, targets
from .tracing import trace

# Built-in passes and backends register themselves by name on import.
from . import passes as _passes  # noqa: E402,F401  isort: skip
from . import backends as _backends  # noqa: E402,F401  isort: skip

__version__ = "0.1.0"

__all__ = [
    "AccuracyBudget", "AccuracyBudgetError", "ArtifactError", "load", "read_metadata", "save",  # issue 9
    "BackendUnavailableError", "CalibrationError", "CompileError", "CompileReport", "CompiledModule",
    "ConfigError", "DumpAfterChange", "Instrument", "NumericCheck", "NumericMismatchError", "Pass",
    "PassContext", "PassError", "PassManager", "PluginWarning", "PassResult", "PassSpec", "QuantConfig", "Target",
    "TimingInstrument", "TraceError", "UnsupportedOpError", "compile", "format_pipeline", "graph_pass",
    "parse_pipeline", "pipeline_for", "prepare_qat", "recalibrate", "register_pass", "register_target",
    "registered_passes", "targets", "trace",
]

"""fxforge: a torch.fx compiler for PyTorch models. ``fxforge.compile(model, target, example_inputs=...)``.

This file is the public API: it re-exports names from the layers below (see docs/design.md for the layout).
"""

from __future__ import annotations

import logging

from . import debug, numerics, testing  # noqa: F401  (fxforge.debug / .numerics / .testing)
from .artifact import load, read_metadata, save
from .capture.tracing import trace
from .compile import compile
from .driver.compiled import CompiledModule
from .driver.qat import prepare_qat
from .errors import (
    AccuracyBudgetError,
    ArtifactError,
    BackendUnavailableError,
    CalibrationError,
    CompileError,
    ConfigError,
    InputShapeError,
    NumericMismatchError,
    PassError,
    PluginWarning,
    TraceError,
    UnsupportedOpError,
)
from .graph import patterns  # noqa: F401  (fxforge.patterns: rewrite rules for custom passes)
from .pipeline.context import PassContext
from .pipeline.instruments import DumpAfterChange, Instrument, NumericCheck, TimingInstrument
from .pipeline.manager import PassManager
from .pipeline.pass_api import Pass, PassResult, graph_pass, register_pass, registered_passes
from .pipeline.report import CompileReport
from .pipeline.targets import Target, pipeline_for, register_target, targets
from .pipeline.text import PassSpec, format_pipeline, parse_pipeline
from .quant.calibration import recalibrate
from .quant.config import QuantConfig
from .search.accuracy import AccuracyBudget
from .version import __version__  # noqa: F401

# A library stays quiet unless its user configures logging: records of the "fxforge" logger (one INFO line per
# pass, WARNING when a compile degrades, DEBUG details) go nowhere until a handler is added (the CLI's -v does).
logging.getLogger(__name__).addHandler(logging.NullHandler())

# Built-in passes and backends register themselves by name on import; viz registers the report page and dumps.
from . import passes as _passes  # noqa: E402,F401  isort: skip
from . import backends as _backends  # noqa: E402,F401  isort: skip
from . import viz as _viz  # noqa: E402,F401  isort: skip

__all__ = [
    "AccuracyBudget", "AccuracyBudgetError", "ArtifactError", "load", "read_metadata", "save",
    "BackendUnavailableError", "CalibrationError", "CompileError", "CompileReport", "CompiledModule",
    "ConfigError", "DumpAfterChange", "InputShapeError", "Instrument", "NumericCheck", "NumericMismatchError", "Pass",
    "PassContext", "PassError", "PassManager", "PluginWarning", "PassResult", "PassSpec", "QuantConfig", "Target",
    "TimingInstrument", "TraceError", "UnsupportedOpError", "compile", "format_pipeline", "graph_pass",
    "parse_pipeline", "pipeline_for", "prepare_qat", "recalibrate", "register_pass", "register_target",
    "registered_passes", "targets", "trace",
]

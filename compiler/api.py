"""The public API: the names ``fxforge`` re-exports from the layers below (see docs/design.md for the layout).

``fxforge/__init__.py`` imports this module the first time one of them is used, so that ``import fxforge`` (and
the ``fxforge`` command line's ``--help``) does not wait for torch. Importing it also imports the built-in passes,
backends and viz, which register themselves.
"""

from __future__ import annotations

import fxforge.debug  # noqa: F401  (the package's attributes fxforge.debug, .numerics, .testing)
import fxforge.numerics  # noqa: F401
import fxforge.testing  # noqa: F401

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
    ExportError,
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

# Built-in passes and backends register themselves by name on import; viz registers the report page and dumps.
import fxforge.passes  # noqa: F401  isort: skip
import fxforge.backends  # noqa: F401  isort: skip
import fxforge.viz  # noqa: F401  isort: skip

__all__ = [
    "AccuracyBudget", "AccuracyBudgetError", "ArtifactError", "load", "read_metadata", "save",
    "BackendUnavailableError", "CalibrationError", "CompileError", "CompileReport", "CompiledModule",
    "ConfigError", "DumpAfterChange", "ExportError", "InputShapeError", "Instrument", "NumericCheck",
    "NumericMismatchError", "Pass",
    "PassContext", "PassError", "PassManager", "PluginWarning", "PassResult", "PassSpec", "QuantConfig", "Target",
    "TimingInstrument", "TraceError", "UnsupportedOpError", "compile", "format_pipeline", "graph_pass",
    "parse_pipeline", "pipeline_for", "prepare_qat", "recalibrate", "register_pass", "register_target",
    "registered_passes", "targets", "trace",
]

"""Typed errors. Every message says what went wrong *and* what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CompileError(Exception):
    """Base class of every error fxforge raises on purpose."""


class ConfigError(CompileError, ValueError):
    """A bad argument: unknown target or pass, bad pass option, bad pipeline text, model in train mode."""


class TraceError(CompileError):
    """The model could not be captured as a torch.fx graph, even with automatic leaf fallback."""


class InputShapeError(CompileError, ValueError):
    """A compiled model was called with inputs outside what it was compiled for (a static dimension of
    another size, a dynamic one out of range, another dtype or argument structure)."""


class PassError(CompileError):
    """A pass failed, or left the graph in a state that does not verify."""

    def __init__(self, message: str, *, pass_name: str, ran_before: list[str]) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.ran_before = ran_before


class NumericMismatchError(PassError):
    """verify="numeric": a pass changed the model's output beyond tolerance."""


class BackendUnavailableError(CompileError):
    """The target exists but this machine cannot run it (no GPU, missing kernel engine)."""


class UnsupportedOpError(CompileError):
    """The graph holds an operation the chosen target cannot run."""


class CalibrationError(CompileError):
    """Calibration data is missing, empty or does not fit the model."""


class PluginUnavailableError(CompileError):
    """A feature needs a plugin package (``fxforge.viz``, ``fxforge.backends``) that is not loaded."""


class PluginWarning(UserWarning):
    """A pass plugin (``fxforge.passes`` entry point) failed to load; its passes are unavailable."""


class AccuracyBudgetError(CompileError):
    """``compile(..., accuracy=...)``: the budget does not hold even with every candidate layer in fp32."""


class ArtifactError(CompileError):
    """A compiled model cannot be saved or loaded: not an fxforge file, a newer format, an incompatible torch
    version, or a submodule that cannot be stored without its class."""


class ExportError(CompileError):
    """A compiled model cannot be written in a deploy format (``compiled.export``: ``.pt2``, AOTInductor,
    ONNX): a node holds something the format cannot keep (quantized tensors, packed parameters), export failed
    on an op, the format is not available, or the exported program does not reproduce the compiled model. The
    message names the node, the op and what to do; ``node`` / ``op`` carry them when known."""

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.node, self.op = node, op


def suggest(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""

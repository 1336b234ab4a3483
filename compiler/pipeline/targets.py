"""Targets: a named pipeline plus a check that this machine can run it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fxforge.errors import BackendUnavailableError, ConfigError, suggest


@dataclass(frozen=True)
class Target:
    """``availability`` returns None when the target can run here, else the reason it cannot."""

    name: str
    description: str
    pipeline: str
    device: str = "cpu"
    availability: Callable[[], str | None] = lambda: None
    quant_backend: str | None = None  # int8 targets: whose qparam rules apply (fbgemm, x86, qnnpack)
    quantized_engine: str | None = None  # int8 targets: the process-wide engine their kernels run under
    mode_pipelines: dict[str, str] = field(default_factory=dict)  # int8 targets: quantization mode -> pipeline

    def pipeline_for_mode(self, mode: str | None) -> str:
        """The pipeline for a quantization mode ("static", "dynamic", "weight-only"); None: the default."""
        if mode is None or mode == "static":
            return self.pipeline
        if self.quant_backend is None:
            int8 = ", ".join(name for name, t in _TARGETS.items() if t.quant_backend is not None)
            raise ConfigError(f"target '{self.name}' runs in fp32: quantization={mode!r} needs an int8 target ({int8})")
        if mode not in self.mode_pipelines:
            modes = ", ".join(["static", *self.mode_pipelines])
            having = ", ".join(name for name, t in _TARGETS.items() if mode in t.mode_pipelines) or "none"
            raise ConfigError(f"quantization={mode!r} is not available on target '{self.name}': choose {modes}, "
                              f"or a target that has {mode!r} ({having})")
        return self.mode_pipelines[mode]


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    _TARGETS[target.name] = target
    return target


def all_targets() -> dict[str, Target]:
    return dict(_TARGETS)


def targets() -> list[str]:
    """Names of the targets usable on this machine."""
    return [name for name, t in _TARGETS.items() if t.availability() is None]


def _known_target(name: str) -> Target:
    if name not in _TARGETS:
        raise ConfigError(
            f"unknown target '{name}'.{suggest(name, _TARGETS)} Valid targets: auto, {', '.join(_TARGETS)}"
        )
    return _TARGETS[name]


def resolve_target(name: str) -> Target:
    """The Target for ``name``; typed errors otherwise. "auto" here (a single build, no measurements) is the fp32
    target of the device: "cuda-fp32" with a GPU, else "cpu"; ``fxforge.compile`` measures instead
    (``fxforge.search.auto``)."""
    if not isinstance(name, str):
        raise ConfigError(f"target must be a target name, got {type(name).__name__}: use 'auto' or one of "
                          f"{', '.join(_TARGETS)}")
    if name == "auto":
        name = "cuda-fp32" if torch.cuda.is_available() and "cuda-fp32" in _TARGETS else "cpu"
    target = _known_target(name)
    reason = target.availability()
    if reason:
        raise BackendUnavailableError(
            f"target '{name}' cannot run on this machine: {reason}. Usable here: {', '.join(targets())}"
        )
    return target


def pipeline_for(target: str, quantization: str | None = None) -> str:
    """The pipeline text of ``target`` (int8 targets: for that quantization mode); works even where the
    target cannot run."""
    return _known_target(target).pipeline_for_mode(quantization)

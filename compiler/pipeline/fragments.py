"""Named pipeline fragments: pass sequences registered once and composed into target pipelines.

As MLIR registers named pass pipelines, a fragment names a sequence of passes that several pipelines share
(``canonicalize``: remove-noops,dce,normalize-inplace,normalize-relu,normalize-gelu), and targets are written
as compositions:
    compose("canonicalize", "fold-bn,fuse-conv", "to-nhwc", "lower-cpu")
A part is pipeline text whose elements are passes or, written bare (no options), registered fragments; or a
``PassSpec``. Variants of a pipeline set a pass's options on its specs (``with_options(text, "lower-cpu",
autotune=True)``) or drop passes (``without``): never by editing the text. Fragments expand when composed; the
composed pipeline is plain pipeline text, which round-trips (``format_pipeline(parse_pipeline(text)) == text``).
"""

from __future__ import annotations

from collections.abc import Iterable

from fxforge.errors import ConfigError, suggest

from .pass_api import registered_passes
from .text import PassSpec, format_pipeline, parse_pipeline

_FRAGMENTS: dict[str, tuple[PassSpec, ...]] = {}


def _expand(parts: Iterable[str | PassSpec]) -> list[PassSpec]:
    specs: list[PassSpec] = []
    for part in parts:
        for spec in [part] if isinstance(part, PassSpec) else parse_pipeline(part):
            specs.extend(_FRAGMENTS[spec.name] if spec.name in _FRAGMENTS and not spec.options else [spec])
    return specs


def register_fragment(name: str, *parts: str | PassSpec) -> tuple[PassSpec, ...]:
    """Register ``parts`` (composed as by ``compose``, so fragments may nest) under ``name``; returns its specs.
    A fragment may not take a pass's name: pipeline text could not tell them apart."""
    (spec,) = parse_pipeline(name)  # the same kebab-case rule as pass names
    if spec.options or spec.name in registered_passes():
        raise ConfigError(f"fragment name {name!r}: use a kebab-case name that no pass has")
    _FRAGMENTS[name] = tuple(_expand(parts))
    return _FRAGMENTS[name]


def fragment(name: str) -> tuple[PassSpec, ...]:
    """The passes of fragment ``name``."""
    if name not in _FRAGMENTS:
        raise ConfigError(f"unknown pipeline fragment {name!r}.{suggest(name, _FRAGMENTS)} "
                          f"Registered: {', '.join(_FRAGMENTS) or 'none'}")
    return _FRAGMENTS[name]


def fragments() -> dict[str, tuple[PassSpec, ...]]:
    return dict(_FRAGMENTS)


def compose(*parts: str | PassSpec) -> str:
    """Pipeline text of ``parts`` in order, registered fragments expanded to their passes."""
    return format_pipeline(_expand(parts))


def _option_text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def with_options(pipeline: str, name: str, **options: object) -> str:
    """``pipeline`` with ``options`` set on every run of pass ``name`` (others kept, new ones appended), e.g.
    ``with_options(pipeline_for("cuda"), "lower-cuda", fused=False)``. ConfigError when no pass has that name."""
    specs = parse_pipeline(pipeline)
    if name not in {s.name for s in specs}:
        raise ConfigError(f"no pass {name!r} in the pipeline {pipeline!r}")
    changes = {key: _option_text(value) for key, value in options.items()}
    return format_pipeline([PassSpec(s.name, _merged(s.options, changes)) if s.name == name else s for s in specs])


def _merged(options: tuple[tuple[str, str], ...], changes: dict[str, str]) -> tuple[tuple[str, str], ...]:
    kept = tuple((key, changes.get(key, value)) for key, value in options)
    return kept + tuple((key, value) for key, value in changes.items() if key not in dict(options))


def without(pipeline: str, *names: str) -> str:
    """``pipeline`` without the passes named ``names``."""
    return format_pipeline([s for s in parse_pipeline(pipeline) if s.name not in names])

"""Slotting passes into a pipeline: ``compile(..., extra_passes={"after:fold-bn": [my_pass]})``.

Anchors: ``"start"``, ``"end"``, ``"before:<pass>"`` and ``"after:<pass>"``, where ``<pass>`` is a pass name in
the pipeline (when it runs more than once, its first run). A pass is given as a Pass instance, a Pass class
(``@graph_pass`` returns one; built with its default options) or pipeline text (``"my-pass{factor=2.0}"``).
Several passes at one anchor run in the order given; the report's pipeline text shows where they went.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fxforge.errors import ConfigError, suggest

from .pass_api import Pass, instantiate
from .text import format_pipeline, parse_pipeline

ANCHOR_FORMS = "'start', 'end', 'before:<pass>' or 'after:<pass>'"


def as_passes(value: Any) -> list[Pass]:
    """One pass-like value (or a list of them) -> Pass instances."""
    items = value if isinstance(value, (list, tuple)) else [value]
    passes: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, type) and issubclass(item, Pass):
            passes.append(item())
        elif isinstance(item, str):
            passes.extend(instantiate(spec) for spec in parse_pipeline(item))
        else:
            raise ConfigError(f"extra_passes: {item!r} is not a pass; give a Pass instance, a Pass class (what "
                              f"@fxforge.graph_pass returns) or pipeline text such as 'my-pass{{option=1}}'")
    return passes


def _parse_anchor(anchor: str, names: Sequence[str], pipeline: str) -> tuple[str, str | None]:
    """'after:fold-bn' -> ("after", "fold-bn"); 'end' -> ("end", None); ConfigError otherwise."""
    if anchor in ("start", "end"):
        return anchor, None
    where, colon, name = anchor.partition(":")
    if not colon or where not in ("before", "after"):
        raise ConfigError(f"extra_passes: unknown anchor {anchor!r}; write {ANCHOR_FORMS}")
    if name not in names:
        raise ConfigError(f"extra_passes: {anchor!r} names no pass of the pipeline '{pipeline}'."
                          f"{suggest(name, names)} Anchor on one of: {', '.join(dict.fromkeys(names))}")
    return where, name


def insert_passes(passes: Sequence[Pass], extra: Mapping[str, Any]) -> list[Pass]:
    """``passes`` with the passes of ``extra`` (anchor -> pass-like or list) slotted in."""
    names = [p.name for p in passes]
    pipeline = format_pipeline([p.spec() for p in passes])
    slots: dict[tuple[str, str | None], list[Pass]] = {}
    for anchor, value in extra.items():
        slots.setdefault(_parse_anchor(anchor, names, pipeline), []).extend(as_passes(value))
    out = list(slots.get(("start", None), []))
    for i, p in enumerate(passes):
        first = names.index(p.name) == i
        out.extend(slots.get(("before", p.name), []) if first else [])
        out.append(p)
        out.extend(slots.get(("after", p.name), []) if first else [])
    return out + slots.get(("end", None), [])

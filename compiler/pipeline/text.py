"""Pipeline text: ``"remove-noops,fold-bn,fuse-conv{post_ops=add+relu},to-nhwc,lower-cpu"``.

The text is the single description of a pipeline: ``compile(pipeline=...)``, ``pipeline_for``, the report
and error messages all use it, and ``format_pipeline(parse_pipeline(text)) == text`` for any text written in
the canonical form (no spaces, options in the order given).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fxforge.errors import ConfigError

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_OPTION_KEY = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class PassSpec:
    """One pipeline element as written: a pass name and its options as text."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``{...}``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ConfigError(f"unbalanced braces in pipeline text at column {i}: {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"unclosed '{{' in pipeline text: {text!r}")
    items.append(text[start:])
    return items


def _parse_options(body: str, item: str) -> tuple[tuple[str, str], ...]:
    options = []
    for pair in filter(None, body.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not _OPTION_KEY.fullmatch(key) or not value:
            raise ConfigError(f"bad option {pair!r} in {item!r}: write options as {{name=value,...}}")
        options.append((key, value))
    return tuple(options)


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text into specs; raises ConfigError with the offending element."""
    specs = []
    for raw in _split_top_level(text.strip()):
        item = raw.strip()
        name, _, rest = item.partition("{")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"bad pass name {name!r} in pipeline {text!r}: names are kebab-case, e.g. 'fold-bn'")
        if rest and not rest.endswith("}"):
            raise ConfigError(f"text after '}}' in {item!r}")
        specs.append(PassSpec(name, _parse_options(rest[:-1], item) if rest else ()))
    return specs


def format_pipeline(specs: list[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)

"""Drawing hooks the core calls but does not implement: ``fxforge.viz`` registers them when imported.

The core never imports viz (viz builds on the core); ``import fxforge`` imports it, which registers
- ``html_report(report, path, graphs) -> Path``: the page ``CompileReport.to_html`` writes;
- ``dot(graph_module, title) -> str``: the DOT text ``DumpAfterChange`` (``compile(dump_dir=...)``) writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import fx

from fxforge.errors import PluginUnavailableError

HtmlReportWriter = Callable[[Any, Path, bool], Path]  # (CompileReport, path, graphs) -> the file written
DotWriter = Callable[[fx.GraphModule, str], str]  # (graph module, title) -> DOT text
_USED_BY = {"html_report": "CompileReport.to_html", "dot": "compile(dump_dir=...) / DumpAfterChange"}
_registered: dict[str, Callable[..., Any]] = {}


def register_renderers(*, html_report: HtmlReportWriter, dot: DotWriter) -> None:
    """Called by ``fxforge.viz`` on import."""
    _registered.update(html_report=html_report, dot=dot)


def _renderer(kind: str) -> Callable[..., Any]:
    if kind not in _registered:
        raise PluginUnavailableError(f"{_USED_BY[kind]} draws graphs with fxforge.viz, which is not loaded: "
                                     f"import fxforge.viz (it needs the graphviz package: pip install graphviz)")
    return _registered[kind]


def html_report_writer() -> HtmlReportWriter:
    return _renderer("html_report")


def dot_writer() -> DotWriter:
    return _renderer("dot")

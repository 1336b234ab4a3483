"""``render`` and ``diff`` front ends: what can be drawn, and writing it by file suffix.

Accepted graphs: an ``fx.GraphModule``, a ``CompiledModule`` (its lowered graph), a report stage
(``compiled.report.stage("fold-bn")``) or a ``GraphSnapshot``. ``.dot``/``.gv`` files get the DOT text;
``.svg``, ``.png`` and ``.pdf`` are laid out by Graphviz's ``dot`` program (OS package ``graphviz``). Without
``dot`` the DOT text is written next to the requested file and a ``GraphvizNotFoundWarning`` says how to
render it; when ``dot`` fails on the graph, the same with a ``GraphvizFailedWarning`` quoting its error.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import graphviz
from torch import fx

from fxforge.driver.compiled import CompiledModule
from fxforge.errors import ConfigError
from fxforge.graph.snapshot import GraphSnapshot, GraphStage, snapshot

from .diff import diff_view
from .dot import View, digraph, view_of

FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf"}
DOT_SUFFIXES = (".dot", ".gv")


class GraphvizWarning(UserWarning):
    """A graph was not drawn: its DOT text was written instead."""


class GraphvizNotFoundWarning(GraphvizWarning):
    """Graphviz's ``dot`` program is missing: a ``.dot`` file was written instead of the picture."""


class GraphvizFailedWarning(GraphvizWarning):
    """Graphviz's ``dot`` program failed on the graph: a ``.dot`` file was written instead of the picture."""


def _dot_error(exc: graphviz.CalledProcessError) -> str:
    stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
    return (stderr.strip().splitlines() or [f"exit status {exc.returncode}"])[0]


def as_snapshot(obj: Any) -> GraphSnapshot:
    """The snapshot of anything ``render`` accepts (see the module docstring); ConfigError otherwise."""
    if isinstance(obj, GraphSnapshot):
        return obj
    if isinstance(obj, GraphStage):
        return obj.graph
    if isinstance(obj, CompiledModule):
        return snapshot(obj.graph_module, f"compiled for {obj.target}")
    if isinstance(obj, fx.GraphModule):
        return snapshot(obj)
    raise ConfigError(f"cannot draw a {type(obj).__name__}: pass an fx.GraphModule, a CompiledModule, a report "
                      f"stage (compiled.report.stage('fold-bn')) or a GraphSnapshot")


def dot_available() -> bool:
    return shutil.which("dot") is not None


def svg_text(graph: graphviz.Digraph) -> tuple[str | None, str]:
    """(the SVG of ``graph`` as text, "") or (None, why not: the ``dot`` program is missing or failed)."""
    try:
        return graph.pipe(format="svg", encoding="utf-8"), ""
    except graphviz.ExecutableNotFound:
        return None, "Graphviz's dot program is not installed"
    except graphviz.CalledProcessError as exc:
        return None, f"Graphviz's dot program failed on this graph: {_dot_error(exc)}"


def write(graph: graphviz.Digraph, path: str | Path) -> Path:
    """Write ``graph`` to ``path`` in the format its suffix names; returns the file written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS and suffix not in DOT_SUFFIXES:
        raise ConfigError(f"cannot write '{path}': name it .svg, .png, .pdf or .dot")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in DOT_SUFFIXES:
        path.write_text(graph.source)
        return path
    try:
        path.write_bytes(graph.pipe(format=FORMATS[suffix]))
        return path
    except graphviz.ExecutableNotFound:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(graph.source)
        warnings.warn(
            f"Graphviz's 'dot' program is not installed, so {path.name} was not drawn: wrote {dot_path} instead. "
            f"Install the OS package graphviz (e.g. 'apt-get install graphviz', 'brew install graphviz'), then run "
            f"'dot -T{FORMATS[suffix]} {dot_path} -o {path}'.", GraphvizNotFoundWarning, stacklevel=3)
        return dot_path
    except graphviz.CalledProcessError as exc:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(graph.source)
        warnings.warn(f"Graphviz's 'dot' program failed on this graph, so {path.name} was not drawn: wrote {dot_path} "
                      f"instead. dot said: {_dot_error(exc)}", GraphvizFailedWarning, stacklevel=3)
        return dot_path


def _titled(view: View, title: str | None) -> View:
    if title is not None:
        view.title = title
    return view


def to_dot(obj: Any, title: str | None = None, *, collapse: bool | None = None, constants: bool = False) -> str:
    """Graphviz DOT text of a graph (anything ``render`` accepts), styled and clustered as ``render`` draws it."""
    return digraph(_titled(view_of(as_snapshot(obj)), title), collapse, constants).source


def render(obj: Any, path: str | Path, *, title: str | None = None, collapse: bool | None = None,
           constants: bool = False) -> Path:
    """Draw a graph to ``path`` (.svg, .png, .pdf or .dot); returns the file written.

    Nodes are styled by role (input/output, conv, linear, fused op, quantize/dequantize, observer, fp32 island,
    layout conversion) and grouped by module. ``collapse``: draw runs of identical blocks once (default: when
    the graph has more than 150 nodes). ``constants``: also draw get_attr nodes (weights, qparams)."""
    return write(digraph(_titled(view_of(as_snapshot(obj)), title), collapse, constants), path)


def diff(before: Any, after: Any, path: str | Path, *, title: str | None = None, collapse: bool | None = None,
         constants: bool = False) -> Path:
    """Draw ``after`` with what changed since ``before`` highlighted: added, rewritten and removed nodes.

    Nodes are matched by name and by the provenance passes record in ``node.meta["fxforge"]`` (a conv that
    absorbed a BatchNorm lists it in its origins), so a removed BN is shown as folded into its conv. Passes
    rewrite GraphModules in place: give two report stages, e.g.
    ``diff(report.stage_before("fold-bn"), report.stage("fold-bn"), "fold-bn.svg")``."""
    view = diff_view(as_snapshot(before), as_snapshot(after))
    return write(digraph(_titled(view, title), collapse, constants), path)

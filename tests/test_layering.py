"""Imports flow down: no cycle between modules, compiler layers import only layers below them, and the core never
imports the plugins (passes/, backends/, viz/), which register themselves with it instead.

Every import statement counts, including those inside functions and ``if TYPE_CHECKING:`` blocks: a lazy import
hides a cycle, it does not remove it. (Parent packages, which Python imports first, are not edges: importing
``fxforge.graph.meta`` does not make a module depend on ``fxforge/__init__.py``.) The checks are plain functions
over an ``nx.DiGraph`` of modules, also run on small synthetic graphs below so that each rule is seen to fail.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends import cpu
from fxforge.errors import PluginUnavailableError, UnsupportedOpError
from fxforge.pipeline import renderers
from fxforge.pipeline.fragments import with_options
from fxforge.serialization import torchscript

ROOT = Path(fxforge.__path__[0]).parent  # the checkout: file names are shown relative to it
# The compiler's layers, lowest first: a module imports from its own layer and from layers listed before it, never
# from one listed after it. A subpackage of compiler/ missing here fails the test: add it where it belongs.
LAYERS: tuple[tuple[str, str], ...] = (
    ("errors", "typed errors: every layer raises them"),
    ("version", "the package version: reports and saved files record it"),
    ("progress", "the one switch for progress bars: every layer with long steps draws them"),
    ("graph", "the fx vocabulary every layer speaks: node meta, op table, matching, patterns, fused modules"),
    ("capture", "tracing turns modules into graphs"),
    ("quant", "the int8 core works on graphs and knows nothing of pipelines or compile"),
    ("numerics", "compares values of graphs, quantized ones included"),
    ("pipeline", "passes, PassManager, targets and the report run over everything below"),
    ("serialization", "lowered graphs as bytes and TorchScript: reads what a pipeline produced"),
    ("testing", "helpers for testing compiled models"),
    ("driver", "compiles once: trace, run the target's pipeline, wrap the result"),
    ("search", "searches that call the driver once per candidate"),
    ("api", "the top-level modules: compile, save/load, debug, api, cli, commands, fxforge/__init__"),
)
RANK = {layer: rank for rank, (layer, _) in enumerate(LAYERS)}

# Plugins: the packages outside compiler/ and what each may import besides the core below "api".
PLUGINS: dict[str, frozenset[str]] = {
    "passes": frozenset({"passes"}),  # passes build on core only
    "backends": frozenset({"backends", "passes"}),  # a backend's recipe and lowering reuse passes
    "viz": frozenset({"viz"}),  # viz draws what the core produced
}
# The only core modules that import plugins: importing them registers the built-in passes, backends and viz.
PLUGIN_IMPORTERS = frozenset({"fxforge.api", "fxforge.commands"})


def modules() -> dict[str, tuple[Path, str, ast.Module]]:
    """module name -> (file, layer, syntax tree) for every .py file of fxforge, from the folders it loads from."""
    found = {}
    for package in ("fxforge", *(f"fxforge.{p}" for p in PLUGINS)):
        root = Path(importlib.import_module(package).__path__[0])
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts[:-1], *([] if parts[-1] == "__init__" else parts[-1:])))
            found[name] = (path, layer_of(name, package, parts), ast.parse(path.read_text(), filename=str(path)))
    return found


def shown(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def layer_of(name: str, package: str, parts: tuple[str, ...]) -> str:
    """The plugin's name, the compiler subpackage (or ``errors``) a module belongs to, else ``api``."""
    if package != "fxforge":
        return package.removeprefix("fxforge.")
    if len(parts) == 1:  # a module directly in compiler/
        return parts[0] if parts[0] in RANK else "api"
    assert parts[0] in RANK, f"{name}: compiler/{parts[0]}/ is in no layer; add it to LAYERS"
    return parts[0]


def imported_names(tree: ast.Module, name: str, is_package: bool) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in the module, relative ones made absolute; ``from m import x``
    gives ``m.x`` (``x`` may be a submodule)."""
    here = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
    return out


def resolve(dotted: str, known: set[str] | dict) -> str | None:
    """The longest prefix of ``dotted`` that is a known module (``fxforge.quant.plan.OBSERVER_KEY`` ->
    ``fxforge.quant.plan``); None for names outside fxforge."""
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_graph(found: dict[str, tuple[Path, str, ast.Module]]) -> nx.DiGraph:
    """Modules as nodes (attribute ``layer``), one edge per importing module and imported module
    (attribute ``where``: file and line of the first such import)."""
    g = nx.DiGraph()
    g.add_nodes_from((name, {"layer": layer}) for name, (_, layer, _) in found.items())
    for name, (path, _, tree) in found.items():
        for dotted, line in imported_names(tree, name, path.name == "__init__.py"):
            target = resolve(dotted, found)
            if target is not None and target != name and not g.has_edge(name, target):
                g.add_edge(name, target, where=shown(path, line))
    return g


def cycles(g: nx.DiGraph) -> list[list[str]]:
    """One cycle (as the modules along it) per strongly connected group of modules."""
    groups = [c for c in nx.strongly_connected_components(g) if len(c) > 1]
    return [[u for u, _ in nx.find_cycle(g.subgraph(group))] for group in sorted(groups, key=sorted)]


def forbidden(importer: str, importer_layer: str, imported_layer: str) -> str | None:
    """Why ``importer`` may not import a module of ``imported_layer``; None when it may."""
    if importer_layer == imported_layer:
        return None
    if importer_layer in PLUGINS:
        allowed = imported_layer in PLUGINS[importer_layer] or imported_layer in RANK and imported_layer != "api"
        return None if allowed else f"plugin '{importer_layer}' imports '{imported_layer}'"
    if imported_layer in PLUGINS:
        return None if importer in PLUGIN_IMPORTERS else f"core imports plugin '{imported_layer}' (register instead)"
    if RANK[imported_layer] > RANK[importer_layer]:
        return f"'{importer_layer}' imports the higher layer '{imported_layer}'"
    return None


def bad_edges(g: nx.DiGraph) -> list[str]:
    """Every import that breaks the layer rules, with where it is and why."""
    out = []
    for u, v, where in g.edges(data="where"):
        reason = forbidden(u, g.nodes[u]["layer"], g.nodes[v]["layer"])
        if reason:
            out.append(f"{where}: {u} imports {v}: {reason}")
    return sorted(out)


def private_imports(found: dict[str, tuple[Path, str, ast.Module]]) -> list[str]:
    """``from other_module import _name`` within fxforge: a private helper used across modules (make it public)."""
    out = []
    for name, (path, _, tree) in found.items():
        for dotted, line in imported_names(tree, name, path.name == "__init__.py"):
            imported = dotted.rpartition(".")[2]
            if imported.startswith("_") and not imported.startswith("__") and resolve(dotted, found):
                out.append(f"{shown(path, line)}: {name} imports {dotted}")
    return out


@pytest.fixture(scope="module")
def found() -> dict[str, tuple[Path, str, ast.Module]]:
    return modules()


@pytest.fixture(scope="module")
def graph(found) -> nx.DiGraph:
    return import_graph(found)


def test_the_graph_holds_every_module_and_its_imports(graph):
    assert {"fxforge", "fxforge.errors", "fxforge.driver.build", "fxforge.passes.fold_bn", "fxforge.viz.html"} \
        <= set(graph)
    assert graph.has_edge("fxforge.pipeline.manager", "fxforge.pipeline.verify")  # a relative import
    assert graph.has_edge("fxforge.api", "fxforge.passes")  # `from . import passes` in fxforge/api.py
    assert graph.has_edge("fxforge.testing", "fxforge.testing.fuzz")  # imported inside a function
    assert graph.nodes["fxforge.quant.plan"]["layer"] == "quant" and graph.nodes["fxforge.cli"]["layer"] == "api"


def test_no_import_cycles(graph):
    loops = cycles(graph)
    assert not loops, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in loops)


def test_imports_flow_down_and_core_never_imports_plugins(graph):
    bad = bad_edges(graph)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_private_names_imported_across_modules(found):
    imports = private_imports(found)
    assert not imports, "private names imported from other modules (make them public):\n" + "\n".join(imports)


# --- the checkers themselves, on synthetic graphs: each rule must be able to fail -------------------------

def synthetic(*edges: tuple[str, str]) -> nx.DiGraph:
    """Modules named ``layer.module`` (``fxforge.<name>`` for the API layer), edges as given."""
    g = nx.DiGraph()
    for u, v in edges:
        for n in (u, v):
            g.add_node(n, layer="api" if n.startswith("fxforge") else n.partition(".")[0])
        g.add_edge(u, v, where="synthetic")
    return g


def test_a_cycle_is_found_and_reported_once():
    g = synthetic(("quant.a", "quant.b"), ("quant.b", "quant.c"), ("quant.c", "quant.a"), ("quant.c", "graph.x"))
    assert cycles(g) == [["quant.a", "quant.b", "quant.c"]]
    assert cycles(synthetic(("quant.a", "quant.b"), ("quant.b", "graph.x"))) == []


@pytest.mark.parametrize(("edge", "reason"), [
    (("quant.plan", "pipeline.report"), "'quant' imports the higher layer 'pipeline'"),
    (("driver.build", "search.accuracy"), "'driver' imports the higher layer 'search'"),
    (("serialization.torchscript", "backends.cpu"), "core imports plugin 'backends' (register instead)"),
    (("pipeline.report", "viz.html"), "core imports plugin 'viz' (register instead)"),
    (("passes.fuse", "backends.cpu"), "plugin 'passes' imports 'backends'"),
    (("backends.cpu", "viz.dot"), "plugin 'backends' imports 'viz'"),
    (("passes.fuse", "fxforge.compile"), "plugin 'passes' imports 'api'"),
    (("fxforge.cli", "backends.cpu"), "core imports plugin 'backends' (register instead)"),  # --help stays light
])
def test_an_upward_or_plugin_import_is_reported(edge, reason):
    assert bad_edges(synthetic(edge)) == [f"synthetic: {edge[0]} imports {edge[1]}: {reason}"]


@pytest.mark.parametrize("edge", [
    ("pipeline.report", "quant.plan"), ("search.accuracy", "driver.build"), ("quant.plan", "quant.ops"),
    ("backends.cpu", "passes.fuse"), ("backends.cpu", "pipeline.pass_api"), ("viz.render", "driver.build"),
    ("fxforge.api", "viz.html"), ("fxforge.commands", "backends.cpu"), ("fxforge.compile", "search.accuracy"),
])
def test_downward_and_registration_imports_are_allowed(edge):
    assert bad_edges(synthetic(edge)) == []


def test_a_private_name_from_another_module_is_reported():
    source = "from .n import _helper, public\nfrom . import n\n\ndef f():\n    from fxforge.a.n import _late\n"
    found = {"fxforge.a.m": (Path("m.py"), "a", ast.parse(source)), "fxforge.a.n": (Path("n.py"), "a", ast.parse(""))}
    assert private_imports(found) == ["m.py:1: fxforge.a.m imports fxforge.a.n._helper",
                                      "m.py:5: fxforge.a.m imports fxforge.a.n._late"]


# --- the core reaches plugins only through what they registered; without it, a typed error says what to load ----

CPU = pytest.mark.skipif("cpu" not in fxforge.targets(), reason="no oneDNN in this torch build")


def conv_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()


@CPU
def test_without_viz_the_report_page_and_dumps_say_what_to_import(tmp_path, monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    report = fxforge.compile(conv_relu(), "cpu", example_inputs=x).report
    monkeypatch.setattr(renderers, "_registered", {})
    with pytest.raises(PluginUnavailableError, match="import fxforge.viz"):
        report.to_html(tmp_path / "report.html")
    with pytest.raises(PluginUnavailableError, match="dump_dir"):
        fxforge.compile(conv_relu(), "cpu", example_inputs=x, dump_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


@CPU
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_without_the_backends_torchscript_twins_the_export_names_the_module(monkeypatch):
    compiled = fxforge.compile(conv_relu(), "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    monkeypatch.setattr(torchscript, "_TWINS", [])
    with pytest.raises(UnsupportedOpError, match="OneDnnConv2d.*import fxforge.backends"):
        compiled.to_torchscript()


@CPU
def test_without_the_kernel_choice_autotune_says_what_to_import(monkeypatch):
    monkeypatch.setattr(cpu, "_AUTOTUNERS", {})
    tuned = with_options(fxforge.pipeline_for("cpu"), "lower-cpu", autotune=True)
    with pytest.raises(PluginUnavailableError, match="fp32_kernel_choice"):
        fxforge.compile(conv_relu(), "cpu", example_inputs=torch.randn(1, 3, 8, 8), pipeline=tuned)


LAZY_API = """
import json, sys
import fxforge
light = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "fxforge"))
from fxforge.compile import compile as compile_fn  # the module named like the function, before the API loads
got = {"light": light, "compile_is_the_function": fxforge.compile is compile_fn,
       "passes": sorted(fxforge.registered_passes()), "targets": sorted(fxforge.pipeline.targets.all_targets()),
       "viz": "fxforge.viz" in sys.modules, "missing": [n for n in fxforge.__all__ if not hasattr(fxforge, n)],
       "modules": [type(getattr(fxforge, n)).__name__ for n in ("debug", "numerics", "patterns", "testing")]}
print(json.dumps(got))
"""


def test_import_fxforge_is_light_and_the_first_name_used_loads_the_api_and_plugins():
    done = subprocess.run([sys.executable, "-c", LAZY_API], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["light"] == ["fxforge", "fxforge.version"] and got["compile_is_the_function"]
    assert {"fold-bn", "lower-cpu"} <= set(got["passes"]) and {"cpu", "x86"} <= set(got["targets"]) and got["viz"]
    assert got["missing"] == [] and got["modules"] == ["module"] * 4


def test_every_public_name_shadowing_a_module_is_declared():
    """A public function named like a compiler/ module must stay the function once that module is imported."""
    package = Path(fxforge.__path__[0])
    clashes = {name for name in fxforge.__all__ if (package / f"{name}.py").exists() or (package / name).is_dir()}
    assert clashes == fxforge.SHADOWED


def test_pyproject_installs_every_package(found):
    """A subpackage missing from pyproject's ``packages`` list imports here (editable) but not from a wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the project also supports 3.10)
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, (path, _, _) in found.items() if path.name == "__init__.py"}
    assert packages == listed, f"missing: {sorted(packages - listed)}; listed but absent: {sorted(listed - packages)}"

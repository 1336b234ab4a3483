"""``fxforge.save`` / ``fxforge.load``: a compiled model as one self-describing file.

The file is a zip archive (stored, not compressed) holding:
- ``fxforge.json``: format version, fxforge and torch versions, target, quantized engine, quantization mode,
  pipeline text, input shapes, a qparams summary; read *before* anything is unpickled, so that a missing
  engine or an incompatible torch fails with a typed error that says what to do (``fxforge.read_metadata``);
- ``report.txt`` / ``report.json``: the compile report, readable without Python;
- ``model.pt``: ``torch.save`` of the lowered graph as data (``fxforge.serialization.codec``) plus the report
  object; with ``recalibratable=True`` also the fp32 graph with its observers, which ``recalibrate`` needs.
``save`` checks that the payload refers only to torch, fxforge and builtins (user submodules the tracer kept
whole become ``torch.export`` programs first), so ``load`` needs neither tracing nor the user's classes.
docs/saving.md says why this representation. Like every pickle-based format, load only files you trust.
"""

from __future__ import annotations

import copy
import io
import json
import re
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fxforge.driver.compiled import CompiledModule
from fxforge.graph.meta import fxmeta
from fxforge.pipeline.targets import all_targets, targets
from fxforge.quant.config import QuantOptions
from fxforge.quant.deprecation import MESSAGE as QUANTIZED_TENSORS_DEPRECATED
from fxforge.quant.qspec import quantized_engine
from fxforge.serialization.codec import (
    foreign_globals,
    graph_attrs,
    graph_records,
    portable_leaves,
    rebuild,
    synthetic_inputs,
)

from .errors import ArtifactError, BackendUnavailableError
from .version import __version__

FORMAT = "fxforge-compiled-model"
FORMAT_VERSION = 1
_MEMBERS = ("fxforge.json", "report.txt", "report.json", "model.pt")


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ArtifactError(f"unreadable torch version {version!r} in the saved model's metadata")
    return int(match.group(1)), int(match.group(2))


def _engine(compiled: Any) -> str | None:
    """The kernel library the compiled graph calls: the quantized engine, oneDNN for cpu, else None."""
    if compiled.quant_options is not None:
        return compiled.quant_options.runtime_engine
    return "onednn" if compiled.target in ("cpu", "cpu-bf16") else None


def _inputs_meta(gm: Any) -> list[dict[str, Any]]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and not fxmeta(node).get("bound"):
            tm = node.meta.get("tensor_meta")
            out.append({"name": str(node.target), "shape": list(tm.shape) if tm is not None else None,
                        "dtype": str(tm.dtype).removeprefix("torch.") if tm is not None else None})
    return out


def _quant_meta(compiled: Any) -> dict[str, Any] | None:
    opts = compiled.quant_options
    if opts is None:
        return None
    summary = compiled.report.quantization
    return {"mode": opts.mode, "backend": opts.backend, "engine": opts.runtime_engine, "skip": list(opts.skip),
            "reduce_range": bool(summary.reduce_range) if summary is not None else None,
            "qparams": [{"layer": r.layer, "op": r.op, "scale": r.scale, "zero_point": r.zero_point,
                         "weight": r.weight} for r in (summary.layers if summary is not None else [])]}


def metadata(compiled: Any, leaves: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "fxforge_version": __version__,
            "torch_version": torch.__version__, "python_version": sys.version.split()[0],
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": compiled.target, "engine": _engine(compiled), "pipeline": compiled.pipeline,
            "quantization": _quant_meta(compiled), "inputs": _inputs_meta(compiled.graph_module),
            "portable_submodules": {path: m.kind for path, m in leaves.items()}}


def _graph_state(gm: Any, inputs: tuple) -> tuple[dict[str, Any], dict[str, Any]]:
    """A graph module as data (``fxforge.serialization.codec``), and the user submodules made portable in it."""
    leaves = portable_leaves(gm, inputs)
    state = {"records": graph_records(gm), "attrs": {**graph_attrs(gm), **leaves}, "class_name": type(gm).__name__}
    return state, leaves


def _payload(compiled: Any, example_inputs: Any, recalibratable: bool) -> tuple[bytes, dict[str, Any]]:
    gm = compiled.graph_module
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        (example_inputs,) if example_inputs is not None else synthetic_inputs(gm))
    if recalibratable and compiled.observed_graph is None:
        raise ArtifactError("recalibratable=True keeps the observers of a static int8 model: this one has none "
                            "(fp32, dynamic or weight-only); save it without recalibratable")
    with quantized_engine(compiled.quant_options.runtime_engine if compiled.quant_options else None):
        state, leaves = _graph_state(gm, inputs)
        if recalibratable:  # a copy: finding its user submodules' inputs would feed its observers
            state["observed"] = _graph_state(copy.deepcopy(compiled.observed_graph), inputs)[0]
    state["report"] = compiled.report
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    foreign = foreign_globals(data)
    if foreign:
        raise ArtifactError(f"the compiled model refers to code outside torch and fxforge ({', '.join(foreign[:5])}): "
                            f"loading it would need that code. Keep such functions out of the traced forward, or "
                            f"make them torch ops")
    return data, {**metadata(compiled, leaves), "recalibratable": recalibratable}


def save(compiled: Any, path: str | Path, *, example_inputs: Any = None, recalibratable: bool = False) -> Path:
    """Write ``compiled`` (from ``fxforge.compile``) to ``path``; returns the path.

    ``example_inputs`` are only needed when the graph holds a submodule the tracer kept whole (it is
    exported with them); by default random inputs of the compiled shapes are used. ``recalibratable``
    (static int8) also stores the fp32 graph with its observers, so that ``fxforge.recalibrate`` works on
    the loaded model (the file then holds the fp32 weights too).
    """
    if not isinstance(compiled, CompiledModule):
        raise ArtifactError(f"fxforge.save takes the module fxforge.compile returned, got {type(compiled).__name__}")
    data, meta = _payload(compiled, example_inputs, recalibratable)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("fxforge.json", json.dumps(meta, indent=2) + "\n")
        archive.writestr("report.txt", str(compiled.report) + "\n")
        archive.writestr("report.json", json.dumps(compiled.report.to_dict(), indent=2, default=str) + "\n")
        archive.writestr("model.pt", data)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved model (nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read("fxforge.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not a model written by fxforge.save ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a model written by fxforge.save (format {meta.get('format')!r})")
    return meta


def check_loadable(meta: dict[str, Any], check_version: bool = True) -> None:
    """Raise the typed error that says what to do when this process cannot run the saved model."""
    if meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"the model was saved in format {meta['format_version']} by fxforge "
                            f"{meta['fxforge_version']}; this fxforge reads up to format {FORMAT_VERSION}: "
                            f"upgrade fxforge")
    saved, running = _major_minor(meta["torch_version"]), _major_minor(torch.__version__)
    if check_version and saved != running:
        raise ArtifactError(
            f"the model was saved with torch {meta['torch_version']} and this is torch {torch.__version__}: prepacked "
            f"int8 / oneDNN weights are not guaranteed to load across torch releases. Load it under torch "
            f"{saved[0]}.{saved[1]}, or compile the original model again here (fxforge.compile); "
            f"check_version=False tries anyway")
    target = all_targets().get(meta["target"])
    if target is None:
        raise ArtifactError(f"the model was compiled for target '{meta['target']}', which this fxforge does not "
                            f"know: load it with fxforge {meta['fxforge_version']}")
    reason = target.availability()
    if reason:
        raise BackendUnavailableError(
            f"the model was compiled for target '{meta['target']}' (engine {meta['engine']}), which cannot run "
            f"here: {reason}. Load it on a machine where fxforge.targets() lists '{meta['target']}', or compile "
            f"the original model for one of the targets usable here: {', '.join(targets())}")


def load(path: str | Path, *, check_version: bool = True) -> CompiledModule:
    """A CompiledModule from a file written by ``fxforge.save``: no tracing, no user classes needed."""
    meta = read_metadata(path)
    check_loadable(meta, check_version)
    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.pt")
    quant = meta["quantization"]
    try:  # prepacked int8 weights are re-packed for the engine current while unpickling: pin the model's own
        with quantized_engine(quant.get("engine", quant["backend"]) if quant else None), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")  # torch's own unpickling of packed weights
            warnings.filterwarnings("ignore", message=QUANTIZED_TENSORS_DEPRECATED, category=UserWarning)
            state = torch.load(io.BytesIO(data), weights_only=False)  # our own payload: modules, packed weights
    except Exception as exc:
        raise ArtifactError(f"{path} could not be read ({type(exc).__name__}: {exc}); it was saved by fxforge "
                            f"{meta['fxforge_version']} with torch {meta['torch_version']}") from exc
    gm = rebuild(state["records"], state["attrs"], state["class_name"])
    observed = rebuild(**state["observed"]) if "observed" in state else None
    options = None if quant is None else QuantOptions(mode=quant["mode"], backend=quant["backend"],
                                                      skip=tuple(quant["skip"]), reduce_range=quant["reduce_range"],
                                                      engine=quant.get("engine"))
    return CompiledModule(gm, meta["target"], meta["pipeline"], state["report"], observed, options)

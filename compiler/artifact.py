"""``fxforge.save`` / ``fxforge.load``: a compiled model as one self-describing file.

The file is a zip archive (stored, not compressed) holding:
- ``fxforge.json``: format version, fxforge and torch versions, target, quantized engine, quantization mode,
  pipeline text, input shapes, a qparams summary, each other member's sha256 and the CPU facts the kernels
  assume (``serialization.isa``); read first, so that damage, a missing engine, an incompatible torch or a
  CPU without VNNI fails with a typed error that says what to do (``fxforge.read_metadata``);
- ``report.txt`` / ``report.json``: the compile report, readable without Python;
- ``model.pt``: ``torch.save`` of the lowered graph as data (``fxforge.serialization.codec``) plus the report
  object; with ``recalibratable=True`` also the fp32 graph with its observers, which ``recalibrate`` needs.
``load`` unpickles ``model.pt`` with ``weights_only=True`` and an allowlist of exact classes
(``serialization.allowlist``): no code from the file runs, and graph call targets resolve only to tensor ops.
User submodules the tracer kept whole are stored as ``torch.export`` / TorchScript programs, whose loaders
run pickled code: they load only with ``trusted=True``. ``save`` writes atomically and reads its payload back
the way ``load`` will. docs/saving.md says why this representation.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fxforge.capture.signature import graph_inputs
from fxforge.driver.compiled import CompiledModule
from fxforge.driver.inputs import InputSpec
from fxforge.graph.meta import fxmeta
from fxforge.pipeline.report import CompileReport
from fxforge.pipeline.targets import all_targets, targets
from fxforge.quant.config import QuantOptions
from fxforge.quant.deprecation import quantized_tensors_quietly
from fxforge.quant.qspec import quantized_engine
from fxforge.serialization.allowlist import needed, savable_classes
from fxforge.serialization.calls import signature_from_data, signature_to_data
from fxforge.serialization.codec import (
    SAFE_FUNCTIONS,
    check_records,
    foreign_globals,
    graph_attrs,
    graph_records,
    payload_bytes,
    payload_trust,
    portable_leaves,
    rebuild,
    stored_globals,
    synthetic_inputs,
)
from fxforge.serialization.isa import check_isa, isa_facts

from .errors import ArtifactError, BackendUnavailableError
from .version import __version__

FORMAT = "fxforge-compiled-model"
FORMAT_VERSION = 2
_MEMBERS = ("fxforge.json", "report.txt", "report.json", "model.pt")
_IDENTITY = ("format_version", "fxforge_version", "torch_version", "target", "engine")  # read before all else
_PAYLOAD = ("members", "isa", "quantization", "pipeline")  # read once the format is known


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
            "portable_submodules": {path: m.kind for path, m in leaves.items()},
            "isa": isa_facts(compiled), **_call_meta(compiled)}


def _call_meta(compiled: Any) -> dict[str, Any]:
    """How the model is called (``serialization.calls``) and the inputs it was compiled for (to explain a
    failed call): plain data, read back by ``_calling``."""
    signature, specs = compiled.signature, compiled.__dict__.get("input_specs")
    return {"signature": None if signature is None else signature_to_data(signature),
            "input_specs": None if specs is None else [
                {"index": s.index, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape),
                 "device": str(s.device)} for s in specs]}


def _calling(path: str | Path, meta: dict[str, Any]) -> tuple[Any, tuple[InputSpec, ...] | None]:
    """The call signature and input specs ``_call_meta`` stored (absent in files saved without them: None)."""
    signature = meta.get("signature")
    specs = meta.get("input_specs")
    try:
        specs = None if specs is None else tuple(
            InputSpec(int(s["index"]), getattr(torch, s["dtype"]), tuple(map(int, s["shape"])),
                      torch.device(s["device"])) for s in specs)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: the metadata's input_specs are damaged ({exc}): save the model again") from None
    if specs is not None and not all(isinstance(s.dtype, torch.dtype) for s in specs):
        raise ArtifactError(f"{path}: the metadata's input_specs name an unknown dtype: save the model again")
    return (None if signature is None else signature_from_data(signature)), specs


def _graph_state(gm: Any, inputs: tuple) -> tuple[dict[str, Any], dict[str, Any]]:
    """A graph module as data (``fxforge.serialization.codec``), and the user submodules made portable in it."""
    leaves = portable_leaves(gm, inputs)
    state = {"records": graph_records(gm), "attrs": {**graph_attrs(gm), **leaves}, "class_name": type(gm).__name__}
    return state, leaves


def _payload(compiled: Any, example_inputs: Any, recalibratable: bool) -> tuple[bytes, dict[str, Any]]:
    gm = compiled.graph_module
    inputs = synthetic_inputs(gm) if example_inputs is None else graph_inputs(compiled.signature, example_inputs)
    if recalibratable and compiled.observed_graph is None:
        raise ArtifactError("recalibratable=True keeps the observers of a static int8 model: this one has none "
                            "(fp32, dynamic or weight-only); save it without recalibratable")
    engine = compiled.quant_options.runtime_engine if compiled.quant_options else None
    with quantized_engine(engine):
        state, leaves = _graph_state(gm, inputs)
        if recalibratable:  # a copy: finding its user submodules' inputs would feed its observers
            state["observed"] = _graph_state(copy.deepcopy(compiled.observed_graph), inputs)[0]
    state["report"] = compiled.report
    data = payload_bytes(state)
    foreign = foreign_globals(data)
    if foreign:
        raise ArtifactError(f"the compiled model refers to code outside torch and fxforge ({', '.join(foreign[:5])}): "
                            f"loading it would need that code. Keep such functions out of the traced forward, or "
                            f"make them torch ops")
    try:  # what load will accept: refuse to write a file that cannot be read back
        _unpickle(data, engine, trusted=True)
    except ArtifactError as exc:
        raise ArtifactError(f"the compiled model holds objects fxforge.load would refuse ({exc}); a runtime module "
                            f"must pickle as tensors and plain data (docs/saving.md)") from exc
    return data, {**metadata(compiled, leaves), "recalibratable": recalibratable}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, members: dict[str, bytes]) -> None:
    """The archive written to a temporary file beside ``path``, synced, then renamed over it: a failure at
    any point leaves the previous file as it was."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a crash once the directory is synced
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save(compiled: Any, path: str | Path, *, example_inputs: Any = None, recalibratable: bool = False) -> Path:
    """Write ``compiled`` (from ``fxforge.compile``) to ``path`` atomically; returns the path.

    ``example_inputs`` are only needed when the graph holds a submodule the tracer kept whole (it is
    exported with them); by default random inputs of the compiled shapes are used. ``recalibratable``
    (static int8) also stores the fp32 graph with its observers, so that ``fxforge.recalibrate`` works on
    the loaded model (the file then holds the fp32 weights too).
    """
    if not isinstance(compiled, CompiledModule):
        raise ArtifactError(f"fxforge.save takes the module fxforge.compile returned, got {type(compiled).__name__}")
    data, meta = _payload(compiled, example_inputs, recalibratable)
    members = {"report.txt": (str(compiled.report) + "\n").encode(),
               "report.json": (json.dumps(compiled.report.to_dict(), indent=2, default=str) + "\n").encode(),
               "model.pt": data}
    meta["members"] = {name: _digest(blob) for name, blob in members.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, {"fxforge.json": (json.dumps(meta, indent=2) + "\n").encode(), **members})
    return path


def _not_ours(path: str | Path, why: str) -> ArtifactError:
    return ArtifactError(f"{path} is not a model written by fxforge.save, or it was damaged ({why})")


def _read_members(path: str | Path, names: tuple[str, ...]) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [name for name in names if name not in archive.namelist()]
            if missing:
                raise _not_ours(path, f"member {', '.join(map(repr, missing))} is missing")
            return {name: archive.read(name) for name in names}
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise _not_ours(path, f"{type(exc).__name__}: {exc}") from None


def _parse_metadata(path: str | Path, raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _not_ours(path, f"fxforge.json is not JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _not_ours(path, f"format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    _require(path, meta, _IDENTITY)
    return meta


def _require(path: str | Path, meta: Any, keys: tuple[str, ...], prefix: str = "") -> None:
    missing = [f"{prefix}{key}" for key in keys if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ArtifactError(f"{path}: the metadata (fxforge.json) lacks {', '.join(map(repr, missing))}: the file "
                            f"was edited or damaged; save the model again")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved model (nothing is unpickled)."""
    return _parse_metadata(path, _read_members(path, ("fxforge.json",))["fxforge.json"])


def check_loadable(meta: dict[str, Any], check_version: bool = True) -> None:
    """Raise the typed error that says what to do when this process cannot run the saved model."""
    if meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"the model was saved in format {meta['format_version']} by fxforge "
                            f"{meta['fxforge_version']}; this fxforge reads up to format {FORMAT_VERSION}: "
                            f"upgrade fxforge")
    if meta["format_version"] < FORMAT_VERSION:
        raise ArtifactError(f"the model was saved in format {meta['format_version']} by fxforge "
                            f"{meta['fxforge_version']}, whose loading runs pickled code; this fxforge reads "
                            f"format {FORMAT_VERSION}: compile the original model again and save it")
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


def _check_members(path: str | Path, meta: dict[str, Any], members: dict[str, bytes]) -> None:
    """ArtifactError unless the checksums in the metadata cover and match every other member."""
    checksums = meta["members"]
    if not isinstance(checksums, dict) or set(checksums) != set(_MEMBERS) - {"fxforge.json"}:
        raise ArtifactError(f"{path}: the metadata's checksums do not cover the members {', '.join(_MEMBERS[1:])}: "
                            f"the file was edited or damaged; save the model again")
    for name, digest in checksums.items():
        if _digest(members[name]) != digest:
            raise ArtifactError(f"{path}: member {name} does not match the checksum saved with it: the file was "
                                f"modified or damaged; save the model again")


def describe(path: str | Path) -> dict[str, Any]:
    """What a saved model holds, for ``fxforge info``: target, versions, engine, inputs and their dims, ISA
    needs, and whether the members match their checksums (hashed, not unpickled: no weights are built)."""
    members = _read_members(path, _MEMBERS)
    meta = _parse_metadata(path, members["fxforge.json"])
    _require(path, meta, _PAYLOAD)
    try:
        _check_members(path, meta, members)
        checksums = "ok"
    except ArtifactError as exc:
        checksums = f"failed: {exc}"
    signature, _ = _calling(path, meta)
    inputs = [c.describe() for c in signature.contracts if c is not None] if signature is not None else \
        [f"{i['name']}: ({', '.join(map(str, i['shape'] or []))}) {i['dtype']}" for i in meta["inputs"]]
    quant = meta["quantization"]
    return {"kind": "fxf", "description": "fxforge.save file: fxforge.load(path), with the same torch minor version",
            "target": meta["target"], "fxforge_version": meta["fxforge_version"],
            "torch_version": meta["torch_version"], "engine": meta["engine"], "pipeline": meta["pipeline"],
            "quantization": None if quant is None else {k: quant.get(k) for k in ("mode", "backend", "engine")},
            "inputs": inputs, "checksums": checksums, "isa": meta["isa"],
            "portable_submodules": meta.get("portable_submodules", {})}


def _unpickle(data: bytes, engine: str | None, trusted: bool) -> dict[str, Any]:
    """The payload, unpickled without running code from it (``fxforge.serialization.allowlist``)."""
    try:
        allowed = needed([*savable_classes(), *SAFE_FUNCTIONS], stored_globals(data))
    except (zipfile.BadZipFile, StopIteration, ValueError) as exc:
        raise ArtifactError(f"model.pt holds something other than tensors and fxforge / torch objects (not a "
                            f"torch.save archive: {type(exc).__name__})") from None
    try:
        with quantized_engine(engine), torch.serialization.safe_globals(allowed), \
                payload_trust(trusted), quantized_tensors_quietly(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")  # torch's own unpickling of qtensors
            state = torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        why = found.group(1) if found else (str(exc).strip().splitlines() or [""])[0]
        raise ArtifactError(f"model.pt holds something other than tensors and fxforge / torch objects ({why})") \
            from None
    except ArtifactError:
        raise
    except Exception as exc:  # an allowlisted class refused its stored state (e.g. an unknown packed weight kind)
        raise ArtifactError(f"model.pt could not be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("report"), CompileReport):
        raise ArtifactError("model.pt does not hold a stored graph and its report")
    return state


def _graph(state: Any) -> Any:
    if not isinstance(state, dict) or not {"records", "attrs", "class_name"} <= state.keys() \
            or not isinstance(state["attrs"], dict):
        raise ArtifactError("model.pt holds a graph without its node records or objects")
    return rebuild(check_records(state["records"]), state["attrs"], str(state["class_name"]))


def load(path: str | Path, *, check_version: bool = True, trusted: bool = False) -> CompiledModule:
    """A CompiledModule from a file written by ``fxforge.save``: no tracing, no user classes needed.

    Nothing in the file is run while loading: the payload holds tensors and data that only fxforge's and
    torch's own classes are rebuilt from. Submodules the tracer kept whole are stored as torch.export or
    TorchScript programs, whose torch loaders do run pickled code: such a file loads only with
    ``trusted=True`` (``ArtifactError`` otherwise).
    """
    members = _read_members(path, _MEMBERS)
    meta = _parse_metadata(path, members["fxforge.json"])
    check_loadable(meta, check_version)
    _require(path, meta, _PAYLOAD)
    quant = meta["quantization"]
    _require(path, meta["isa"], ("requires_vnni", "engine"), "isa.")
    _require(path, quant or {}, ("mode", "backend", "skip", "reduce_range") if quant else (), "quantization.")
    check_isa(meta["isa"])
    _check_members(path, meta, members)
    engine = quant.get("engine", quant["backend"]) if quant else None
    state = _unpickle(members["model.pt"], engine, trusted)
    gm = _graph(state)
    observed = _graph(state["observed"]) if "observed" in state else None
    options = None if quant is None else QuantOptions(mode=quant["mode"], backend=quant["backend"],
                                                      skip=tuple(quant["skip"]), reduce_range=quant["reduce_range"],
                                                      engine=quant.get("engine"))
    signature, specs = _calling(path, meta)
    compiled = CompiledModule(gm, meta["target"], meta["pipeline"], state["report"], observed, options, signature)
    compiled.__dict__["input_specs"] = specs
    return compiled

"""``compiled.export(path, format=None, **options)``: the compiled model in a format that runs without fxforge.

The one table of deploy formats (``FORMATS``): name, file suffix, writer. The format comes from ``format=`` or
else from the file name: ``.aoti.pt2`` is an AOTInductor package, any other ``.pt2`` a ``torch.export`` program,
``.onnx`` an ONNX model. (AOTInductor packages are ``.pt2`` files too; the longer suffix tells them apart, and
``fxforge info`` tells them apart by content.)
- ``pt2``: ``torch.export.save`` of the program (``program.export_program``), bit-identical to the compiled model
  (dynamic int8 included, in plain ops); runs with ``torch.export.load(path).module()``; options
  ``example_inputs``, ``dynamic``.
- ``aoti``: the same program compiled ahead of time by AOTInductor (``torch._inductor.aoti_compile_and_package``)
  into a shared library in a package; runs with ``torch._inductor.aoti_load_package(path)``. Inductor fuses and
  reorders: outputs agree within float rounding, not bit for bit. Same options.
- ``onnx``: ``fxforge.serialization.onnx.export_onnx`` (QDQ for static int8, DynamicQuantizeLinear /
  MatMulInteger and DynamicQuantizeLSTM for dynamic int8); options ``opset``, ``dynamic``, ``example_inputs``.
Every format records what ``fxforge info`` shows (``fxforge.json``: target, versions, pipeline; the torch formats
inputs and CPU facts, ONNX what the file runs otherwise than the compiled model).
A backend whose lowered graph runs in another runtime (OpenVINO) holds the model in that runtime's input format:
it registers a writer (``register_deploy_writer``) that writes what it holds, or refuses a format with an
``ExportError``, for the compiled models that are its own; the formats above serve every other model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxforge.errors import ConfigError, ExportError, suggest
from fxforge.version import __version__

from .isa import isa_facts
from .onnx import METADATA, export_onnx
from .program import export_program

log = logging.getLogger(__name__)

# METADATA (onnx.py): the member fxforge info reads (pt2: extra file; aoti: package metadata key; onnx: metadata_props)


@dataclass(frozen=True)
class DeployFormat:
    name: str
    suffix: str
    description: str
    write: Callable[..., Path]  # (compiled, path, **options) -> path


def program_metadata(compiled: Any, program: torch.export.ExportedProgram, kind: str) -> dict[str, Any]:
    """What a deployed file records about the compiled model (plain JSON data)."""
    inputs = [{"name": spec.arg.name, "shape": [str(d) for d in node.meta["val"].shape],
               "dtype": str(node.meta["val"].dtype).removeprefix("torch.")}
              for spec, node in zip(program.graph_signature.input_specs,
                                    program.graph.find_nodes(op="placeholder"), strict=True)
              if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    ranges = {str(s): f"{r.lower}..{r.upper}" for s, r in program.range_constraints.items()}
    return {"format": kind, "fxforge_version": __version__, "torch_version": torch.__version__,
            "target": compiled.target, "pipeline": compiled.pipeline, "inputs": inputs, "dynamic_dims": ranges,
            "isa": isa_facts(compiled)}


def save_program(compiled: Any, path: Path, *, example_inputs: Any = None, dynamic: bool = True) -> Path:
    """The ``pt2`` format (module docstring)."""
    program = export_program(compiled, example_inputs, dynamic=dynamic)
    meta = program_metadata(compiled, program, "pt2")
    torch.export.save(program, str(path), extra_files={METADATA: json.dumps(meta, indent=2)})
    return path


def save_aoti(compiled: Any, path: Path, *, example_inputs: Any = None, dynamic: bool = True) -> Path:
    """The ``aoti`` format (module docstring): compiling takes tens of seconds to minutes."""
    program = export_program(compiled, example_inputs, dynamic=dynamic)
    meta = {METADATA: json.dumps(program_metadata(compiled, program, "aoti"))}
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"aot_inductor.metadata": meta})
    except Exception as exc:  # Inductor's failures come from many layers (codegen, the C++ compiler, the linker)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"AOTInductor could not compile the exported program ({type(exc).__name__}: {first}); it "
                          f"needs a working C++ compiler. The .pt2 program (format='pt2') needs none") from exc
    return path


FORMATS: dict[str, DeployFormat] = {f.name: f for f in (
    DeployFormat("pt2", ".pt2", "torch.export program (torch.export.load); bit-identical outputs", save_program),
    DeployFormat("aoti", ".aoti.pt2", "AOTInductor package (torch._inductor.aoti_load_package)", save_aoti),
    DeployFormat("onnx", ".onnx", "ONNX model (onnxruntime, OpenVINO); static int8 as QDQ, dynamic int8 as "
                 "DynamicQuantizeLinear / MatMulInteger / DynamicQuantizeLSTM", export_onnx),
)}


# (compiled, format name, path, options) -> the written path, or None: not a model of the writer's backend
DeployWriter = Callable[[Any, str, Path, dict[str, Any]], Path | None]
_WRITERS: list[DeployWriter] = []  # filled by the backends on import


def register_deploy_writer(writer: DeployWriter) -> DeployWriter:
    """Let ``writer`` write (or refuse) the deploy formats of its backend's compiled models (a decorator)."""
    if writer not in _WRITERS:
        _WRITERS.append(writer)
    return writer


def format_for(path: Path, format: str | None) -> DeployFormat:
    """The format named by ``format``, else the one whose suffix ``path`` ends with (the longest match)."""
    if format is not None:
        if format not in FORMATS:
            raise ConfigError(f"unknown export format {format!r}.{suggest(format, FORMATS)} Formats: "
                              f"{', '.join(FORMATS)}")
        return FORMATS[format]
    matches = [f for f in FORMATS.values() if path.name.lower().endswith(f.suffix)]
    if not matches:
        known = ", ".join(f"{f.suffix} ({f.name})" for f in FORMATS.values())
        raise ConfigError(f"cannot tell the export format from the file name {path.name!r}: name it {known}, or pass "
                          f"format= one of {', '.join(FORMATS)}")
    return max(matches, key=lambda f: len(f.suffix))


def export(compiled: Any, path: str | Path, format: str | None = None, **options: Any) -> Path:
    """Write ``compiled`` to ``path`` in a deploy format (module docstring); returns the path."""
    path, chosen = Path(path), format_for(Path(path), format)
    written = next((w for w in (write(compiled, chosen.name, path, options) for write in _WRITERS) if w), None)
    written = written or chosen.write(compiled, path, **options)
    log.info("exported the %s model to %s (%s)", compiled.target, written, chosen.name)
    return written

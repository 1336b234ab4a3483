"""What a deployed file holds, for ``fxforge info``: torch.export programs, AOTInductor packages, ONNX models.

``deployed_kind`` tells the kinds apart by content (both torch formats are zip archives named ``.pt2``: a
program holds ``models/*.json``, a package ``data/aotinductor/``; an ONNX model is a protobuf read by the
``onnx`` package). ``describe_deployed`` returns plain data: inputs and outputs with their dims, dynamic ranges,
the fxforge metadata ``compiled.export`` recorded (``deploy.METADATA``) and, for packages, the CPU ISA the
compiled code was built for. A program is loaded with ``torch.export.load`` (its weights too: the signature is
part of the program); a package's shared library is not loaded; an ONNX model is read without external data.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from fxforge.errors import ArtifactError, ExportError

from .deploy import METADATA

_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return []


def deployed_kind(path: str | Path) -> str | None:
    """``"pt2"`` (torch.export program), ``"aoti"`` (AOTInductor package), ``"onnx"``, or None (none of these)."""
    path = Path(path)
    names = _zip_names(path)
    if any("/data/aotinductor/" in n for n in names):
        return "aoti"
    if any("/models/" in n and n.endswith(".json") for n in names):
        return "pt2"
    return "onnx" if path.suffix.lower() == ".onnx" and path.is_file() else None


def _dims(shape: Any) -> list[str]:
    return [str(d) for d in shape]


def _program_info(path: Path) -> dict[str, Any]:
    extra = {METADATA: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # a damaged archive fails anywhere in the deserializer
        raise ArtifactError(f"{path} looks like a torch.export program but does not load ({type(exc).__name__}: "
                            f"{exc}): export it again") from exc
    placeholders = {n.name: n for n in program.graph.find_nodes(op="placeholder")}
    inputs = [{"name": s.arg.name, "shape": _dims(placeholders[s.arg.name].meta["val"].shape),
               "dtype": str(placeholders[s.arg.name].meta["val"].dtype).removeprefix("torch.")}
              for s in program.graph_signature.input_specs
              if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    output = next(iter(program.graph.find_nodes(op="output")))
    outputs = [{"shape": _dims(n.meta["val"].shape), "dtype": str(n.meta["val"].dtype).removeprefix("torch.")}
               for n in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(n, torch.fx.Node)]
    ranges = {str(s): f"{r.lower}..{r.upper}" for s, r in program.range_constraints.items()}
    ops = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"})
    return {"kind": "pt2", "description": "torch.export program: torch.export.load(path).module()",
            "inputs": inputs, "outputs": outputs, "dynamic_dims": ranges, "ops": ops,
            "fxforge": _recorded(extra[METADATA], ("inputs", "dynamic_dims"))}


def _recorded(text: str | None, shown: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The fxforge metadata ``compiled.export`` recorded (None in files written otherwise), less ``shown``."""
    if not text:
        return None
    return {k: v for k, v in json.loads(text).items() if k not in shown}


def _package_info(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        found = [n for n in names if n.endswith("_metadata.json") and "/data/aotinductor/" in n]
        meta = {k: v for n in found for k, v in json.loads(archive.read(n)).items()}
    fxforge_meta = meta.pop(METADATA, None)
    return {"kind": "aoti", "description": "AOTInductor package: torch._inductor.aoti_load_package(path)",
            "cpu_isa": meta.get("AOTI_CPU_ISA"), "platform": f"{meta.get('AOTI_PLATFORM')}/{meta.get('AOTI_MACHINE')}",
            "device": meta.get("AOTI_DEVICE_KEY"), "libraries": sum(n.endswith(".so") for n in names),
            "fxforge": _recorded(fxforge_meta)}


def _onnx_value(value: Any, data_type: Any) -> dict[str, Any]:
    """An ONNX graph input or output: name, dims (symbolic names or sizes), element type (``data_type``:
    onnx's ``TensorProto.DataType`` enum)."""
    dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
    return {"name": value.name, "shape": dims, "dtype": data_type.Name(value.type.tensor_type.elem_type).lower()}


def _onnx_info(path: Path) -> dict[str, Any]:
    try:
        import onnx  # optional dependency (the [export] extra): only to read ONNX files
    except ImportError:
        raise ExportError("reading an ONNX model needs the onnx package: pip install 'fxforge[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    ops = {n.op_type for n in model.graph.node}
    return {"kind": "onnx", "description": "ONNX model (onnxruntime, OpenVINO)",
            "opset": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "inputs": [_onnx_value(v, onnx.TensorProto.DataType) for v in model.graph.input],
            "outputs": [_onnx_value(v, onnx.TensorProto.DataType) for v in model.graph.output],
            "qdq": bool(ops & _QDQ), "nodes": len(model.graph.node),
            "ops": sorted(ops), "fxforge": _recorded({p.key: p.value for p in model.metadata_props}.get(METADATA))}


_READERS = {"pt2": _program_info, "aoti": _package_info, "onnx": _onnx_info}


def describe_deployed(path: str | Path, kind: str) -> dict[str, Any]:
    """What the file of ``kind`` (``deployed_kind``) holds, as plain data (module docstring)."""
    return _READERS[kind](Path(path))

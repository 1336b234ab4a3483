"""``export_onnx``: a compiled model as an ONNX file that ONNX Runtime, OpenVINO or TensorRT run without fxforge.

What graph is written:
- static int8 targets (x86, fbgemm, qnnpack): the QDQ graph (``onnx_qdq.qdq_graph``): fp32 ops between
  QuantizeLinear / DequantizeLinear with fxforge's activation qparams, int8 weights with per-channel (or
  per-tensor) DequantizeLinear as the compile chose, fp32 islands in fp32. Runtimes fuse ``DQ -> Conv -> Q``
  into their int8 kernels (ORT: QLinearConv, QGemm).
- fp32 targets: the lowered graph, each runtime module the exporter cannot record (oneDNN prepacked weights)
  swapped for its ONNX twin, an eager module on the same dense weights (backends register twins with
  ``register_onnx_twin``; this module never imports them). The twin computes the same function, so the ONNX
  output equals the compiled model's up to float summation order.
- dynamic int8 targets: the lowered graph, its dynamic int8 linears on plain int8 tensors (``dynamic_int8``)
  written as DynamicQuantizeLinear -> MatMulInteger -> scale and bias, its RNN modules swapped for their twins:
  int8 LSTM layers as ONNX Runtime's DynamicQuantizeLSTM, fp16 / bf16 layers as ONNX LSTM in fp32
  (``onnx_dynamic``; the file records what it runs otherwise than the compiled model, e.g. bf16 layers in fp32).
  Activation qparams are chosen per call by the runtime: outputs agree within int8 rounding.
Each file records the compile (target, versions, pipeline, those notes) as ``metadata_props[METADATA]``.
All go through ``torch.onnx.export(dynamo=True)``. Dimensions the compiled model takes at any size (its
signature's symbols: batch, sequence) stay dynamic with ``dynamic=True``. Inputs are the graph's flat
tensors (keyword arguments flattened as the compiled model's signature does); outputs its flat outputs.
What is not exported is an ``ExportError`` naming the node and op: weight-only int8 (int8/int4 weight kernels
on fp32 activations), a dynamic int8 GRU (ONNX Runtime has no such op), CUDA targets (CUDA graphs), a
compile with correct-bias (``onnx_qdq``), modules the exporter cannot record.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxforge.capture.signature import graph_inputs
from fxforge.errors import ExportError
from fxforge.graph.meta import fxmeta
from fxforge.quant.qspec import backend_quant
from fxforge.version import __version__

from .codec import copy_graph_module, synthetic_inputs
from .dynamic_int8 import unpack_linears
from .onnx_dynamic import DYNAMIC_LINEAR
from .onnx_dynamic import translations as dynamic_translations
from .onnx_qdq import DEQUANTIZE, FAKE_QUANTIZE, qdq_graph

__all__ = ["METADATA", "export_onnx", "register_onnx_twin"]

log = logging.getLogger(__name__)

METADATA = "fxforge.json"  # what compiled.export records in a file for fxforge info (ONNX: a metadata_props key)

OnnxTwin = Callable[[nn.Module], nn.Module | None]  # a runtime module's eager twin; None: not its kind
_TWINS: list[OnnxTwin] = []  # filled by the backends on import


def register_onnx_twin(twin: OnnxTwin) -> OnnxTwin:
    """Let ``export_onnx`` swap the runtime modules ``twin`` recognizes for eager twins (a decorator)."""
    if twin not in _TWINS:
        _TWINS.append(twin)
    return twin


def _twin(module: nn.Module) -> nn.Module | None:
    return next((t for t in (convert(module) for convert in _TWINS) if t is not None), None)


def _fp32_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The lowered graph with its runtime modules swapped for their ONNX twins (a copy)."""
    replace: dict[str, Any] = {}
    for node in gm.graph.nodes:
        try:
            twin = _twin(gm.get_submodule(str(node.target))) if node.op == "call_module" else None
        except ExportError as exc:  # a twin that refuses its module: name the node
            raise ExportError(f"node '{node.name}': {exc}", node=node.name, op=exc.op) from exc
        if twin is not None:
            replace[str(node.target)] = twin
    return copy_graph_module(gm, replace)


def _export_graph(compiled: Any) -> fx.GraphModule:
    """The graph ``export_onnx`` writes (see the module docstring), or ExportError for what ONNX cannot hold."""
    target, opts = str(compiled.target), compiled.quant_options
    if target.startswith("cuda"):
        raise ExportError(f"target {target!r} runs CUDA graphs and cuDNN fused kernels, which ONNX cannot hold: "
                          "compile for 'cpu' (fp32) or an int8 CPU target and export that", op=target)
    if opts is None:
        return _fp32_graph(compiled.graph_module)
    if opts.mode == "dynamic":
        return _dynamic_graph(compiled.graph_module)
    if opts.mode != "static":
        node, op = _first_runtime_module(compiled.graph_module)
        raise ExportError(f"quantization={opts.mode!r} (target {target!r}) has no ONNX form here: the export "
                          f"writes static and dynamic int8{f' (node {node}: {op})' if node else ''}. Compile with "
                          "quantization='static' and calibration data or quantization='dynamic', or export the fp32 "
                          "'cpu' compile", node=node, op=op or opts.mode)
    return qdq_graph(compiled)


def _dynamic_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A dynamic int8 graph for ONNX: its linears on plain int8 tensors (``fxforge::dynamic_linear``), its RNN
    modules swapped for their twins (``fxforge::dynamic_lstm`` for int8 layers, ONNX LSTM for the others)."""
    unpacked, _ = unpack_linears(gm, DYNAMIC_LINEAR)
    return _fp32_graph(unpacked)


def _runtime_modules(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(node, class name) of the called modules that are not torch's nor fxforge's graph modules."""
    out = []
    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if module is not None and not type(module).__module__.startswith(("torch.", "fxforge.graph")):
            out.append((node.name, type(module).__name__))
    return out


def _first_runtime_module(gm: fx.GraphModule) -> tuple[str | None, str | None]:
    return next(iter(_runtime_modules(gm)), (None, None))


def _dynamic_shapes(compiled: Any, inputs: tuple) -> tuple[dict[int, Any], ...] | None:
    """Per graph input, its dimensions without a fixed size (``Dim.DYNAMIC``: torch.export finds the equal ones).
    Not ``program.dynamic_shapes``: that one fixes dims of size 1 in the example (a ``.pt2`` program specializes
    them), while the ONNX exporter keeps a ``Dim.DYNAMIC`` batch of 1 symbolic (a batch-1 compile exports a file
    that runs at any batch, tested in tests/test_cli.py)."""
    signature = compiled.signature
    if signature is None:
        return None
    shapes = []
    for contract, value in zip(signature.contracts, inputs, strict=False):
        dims = {} if contract is None or not isinstance(value, torch.Tensor) else \
            {i: torch.export.Dim.DYNAMIC for i, d in enumerate(contract.dims) if d.symbol is not None}
        shapes.append(dims)
    return tuple(shapes)


def _translations() -> dict[Any, Callable[..., Any]]:
    """fxforge's fake-quantize op as ONNX QuantizeLinear -> DequantizeLinear, its dequantize as DequantizeLinear;
    hardsigmoid as Add -> Clip -> Div (torch's formula) rather than HardSigmoid: OpenVINO reads that pattern as
    its HSigmoid, fused with the ops (and in a QDQ graph the quantize-dequantize pairs) around it, where its ONNX
    HardSigmoid is a float reference kernel of its own; ONNX Runtime runs either form."""
    try:  # optional dependencies ([export] extra), needed only to export
        import onnx  # noqa: F401  (torch.onnx writes the file with it)
        from onnxscript import opset18 as op
    except ModuleNotFoundError as exc:
        raise ExportError(f"ONNX export needs {exc.name}: pip install 'fxforge[export]'") from exc

    def onnx_fake_quantize(x: Any, scale: Any, zero_point: Any) -> Any:
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def onnx_dequantize(q: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def onnx_hardsigmoid(x: Any) -> Any:  # torch's formula, min(max(x + 3, 0), 6) / 6
        three, six = op.CastLike(3.0, x), op.CastLike(6.0, x)
        return op.Div(op.Clip(op.Add(x, three), op.CastLike(0.0, x), six), six)

    return {FAKE_QUANTIZE: onnx_fake_quantize, DEQUANTIZE: onnx_dequantize,
            torch.ops.aten.hardsigmoid.default: onnx_hardsigmoid, **dynamic_translations(op)}


def _input_names(gm: fx.GraphModule) -> list[str]:
    """The graph's inputs a call gives (arguments the tracer bound to constants are not inputs)."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder" and not fxmeta(n).get("bound")]


def export_onnx(compiled: Any, path: str | Path, *, opset: int | None = None, dynamic: bool = True,
                example_inputs: Any = None) -> Path:
    """Write ``compiled`` (a ``CompiledModule``) to ``path`` as ONNX; see the module docstring for what is written.

    ``opset``: the ONNX opset (None: torch.onnx's default); ``dynamic``: keep the dimensions the compiled model
    takes at any size (batch, sequence) dynamic, else fix every dimension to the example inputs';
    ``example_inputs``: what to trace with (default: random tensors of the compiled shapes).
    """
    gm = _export_graph(compiled)
    inputs = synthetic_inputs(compiled.graph_module) if example_inputs is None else \
        graph_inputs(compiled.signature, example_inputs)
    shapes = _dynamic_shapes(compiled, inputs) if dynamic else None
    path = Path(path)
    translations = _translations()  # a missing package is said before tracing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
            program = torch.onnx.export(gm, inputs, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                        custom_translation_table=translations,
                                        input_names=_input_names(gm), verbose=False)
    except Exception as exc:  # the exporter's own message: name the modules it could not record
        raise _export_failure(gm, exc) from exc
    meta = _metadata(compiled, gm)
    program.model.metadata_props[METADATA] = json.dumps(meta)
    program.save(str(path))
    for note in meta["notes"]:
        log.info("ONNX export of target %s: %s", compiled.target, note)
    log.info("exported %s (target %s) to ONNX: %s", type(compiled).__name__, compiled.target, path)
    return path


def _metadata(compiled: Any, gm: fx.GraphModule) -> dict[str, Any]:
    """What the file records about the compile (plain JSON data), with what it runs otherwise than the compiled
    model (``notes``: the twins' ``export_note``, dynamic int8's activation bits)."""
    notes = [f"{name}: {note}" for name, m in gm.named_modules() if (note := getattr(m, "export_note", None))]
    opts = compiled.quant_options
    if opts is not None and opts.mode == "dynamic" and backend_quant(opts.backend, opts.reduce_range).reduce_range:
        notes.append("activations are quantized per call to 8 bits (ONNX's DynamicQuantizeLinear); the compiled "
                     "model uses 7 (reduce_range)")
    return {"format": "onnx", "fxforge_version": __version__, "torch_version": torch.__version__,
            "target": compiled.target, "pipeline": compiled.pipeline,
            "quantization": None if opts is None else opts.mode, "notes": notes}


def _export_failure(gm: fx.GraphModule, exc: Exception) -> ExportError:
    foreign = _runtime_modules(gm)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    node, op = foreign[0] if foreign else (None, None)
    where = f"; modules that are not torch's: {', '.join(f'{n} ({t})' for n, t in foreign)}" if foreign else ""
    return ExportError(f"torch.onnx.export failed ({type(exc).__name__}: {first}){where}. Backends register ONNX "
                       "twins of their runtime modules on import (import fxforge.api); a custom op needs an ONNX "
                       "translation (torch.onnx custom_translation_table): use fxforge.save otherwise",
                       node=node, op=op)

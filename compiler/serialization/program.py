"""The compiled model as a ``torch.export`` program: what ``.pt2`` files and AOTInductor packages hold.

``export_program`` runs ``torch.export.export`` (non-strict) on the lowered graph module. Export traces through
the runtime modules into the ops they call; a backend module holding something a program cannot keep gives
itself an export form under ``torch.compiler.is_exporting()`` (the cpu backend's oneDNN modules call the same
ops with their dense weight instead of the opaque prepacked one) and registers fake kernels for ops torch ships
without one. The program needs neither fxforge nor the model's code to run: ``torch.export.load(path).module()``.
Why the result is the compiled model: it is a trace of the same modules on the same ops and weights; it is
checked on the example inputs (``torch.equal`` on every output) before it is returned.

Calls: the program takes the graph's tensor inputs positionally, in the order of the model's arguments
(``torch.export`` programs take their arguments as they were exported), and returns what the lowered graph
returns: a symbolically traced model's own structure of tensors, tuples and dicts; for a model captured with
torch.export (transformers' models) the leaves of its output (a ``ModelOutput``) in order, so that loading
needs no model code. Dynamic dims: the compiled model's call signature names the dims that may vary
and their ranges; the program keeps those symbolic (``torch.export.Dim``), the others fixed. Bit-identical at the
compiled shapes; at other sizes oneDNN may pick another kernel for the dense weight than for the weight prepacked
for the example's size (a linear layer at batch 1), which agrees within float rounding.
Dynamic int8: each ``quantized.linear_dynamic`` call reads its weight unpacked onto plain tensors
(``dynamic_int8.unpack_linears``) through ``quant.dynamic_kernels.dynamic_linear``, and ``DynamicInt8RNN``
exports its plain-op form: bit-identical on the fbgemm and x86 engines (checked like every program), within
float rounding on qnnpack (checked: ``CLOSE_FLOOR_DB`` of SQNR), the sequence length fixed (an int8 RNN's steps
are unrolled).
Preconditions: the graph holds plain tensors: quantized tensors and packed parameters (the torch.ao int8 kernels
of the static int8 targets) have no export form, and ``ExportError`` names the node (ONNX is the static int8
deploy format for now).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from fxforge.capture.signature import CallSignature, Dimension, graph_inputs
from fxforge.errors import ExportError
from fxforge.numerics.metrics import flat_tensors
from fxforge.quant.dynamic_kernels import dynamic_linear
from fxforge.quant.sqnr import outputs_sqnr_db

from .codec import synthetic_inputs
from .dynamic_int8 import unpack_linears

log = logging.getLogger(__name__)

BIT_EXACT_ENGINES = ("x86", "fbgemm")  # whose dynamic int8 kernels quant.dynamic_kernels reproduces bit for bit
CLOSE_FLOOR_DB = 60.0  # the other engines' (qnnpack): float rounding apart, 144 dB measured on a 2-layer LSTM

INT8_ADVICE = ("Static int8 deploys as ONNX for now: compiled.export('model.onnx'), or fxforge.save it (with fxforge "
               "to load it). Dynamic int8 exports here and as ONNX")


def _held_values(module: nn.Module) -> list[Any]:
    """The tensors and script objects a module (and its submodules) holds, registered or plain attributes."""
    values: list[Any] = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        values.extend(sub.__dict__.values())
    return values


def _unkeepable(value: Any) -> str | None:
    """What a program cannot hold about ``value``, else None."""
    if isinstance(value, torch.ScriptObject):
        return "packed parameters (a torch.ao script object)"
    if isinstance(value, torch.Tensor) and value.is_quantized:
        return f"a quantized tensor ({value.dtype})"
    return None


def _node_problem(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        found = next((w for w in map(_unkeepable, _held_values(module)) if w), None)
        return None if found is None else f"{type(module).__name__} holds {found}"
    if node.op == "get_attr":
        return _unkeepable(functools.reduce(getattr, str(node.target).split("."), gm))
    meta = node.meta.get("tensor_meta")
    if node.op == "call_function" and getattr(meta, "is_quantized", False):
        return f"it returns a quantized tensor ({meta.dtype})"
    return None


def _target_name(node: fx.Node) -> str:
    return str(node.target) if isinstance(node.target, (str, torch._ops.OpOverload)) else \
        getattr(node.target, "__name__", str(node.target))


def check_exportable(gm: fx.GraphModule) -> None:
    """ExportError for the first node holding or producing what a program cannot keep (see the docstring)."""
    for node in gm.graph.nodes:
        problem = _node_problem(gm, node)
        if problem is not None:
            raise ExportError(f"node '{node.name}' ({node.op} {_target_name(node)}): {problem}, which torch.export "
                              f"cannot save. {INT8_ADVICE}")


def _dim(dimension: Dimension, dims: dict[str, Any]) -> Any:
    """One ``Dim`` per symbol (inputs sharing a symbol share the Dim, so export keeps them equal)."""
    if dimension.symbol not in dims:
        name = re.sub(r"\W", "_", dimension.symbol)
        dims[dimension.symbol] = Dim(name if name.isidentifier() else f"d_{name}", min=dimension.low,
                                     max=dimension.high)
    return dims[dimension.symbol]


def dynamic_shapes(signature: CallSignature | None, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """export's ``dynamic_shapes`` for the positional graph ``inputs`` from the signature's shape contract. A dim
    of size 0 or 1 in the example stays fixed: export specializes such sizes (its 0/1 rule)."""
    if signature is None:
        return None
    dims: dict[str, Any] = {}
    shapes = []
    for value, contract in zip(inputs, (signature.contracts + [None] * len(inputs))[:len(inputs)], strict=True):
        free = [] if contract is None or not isinstance(value, torch.Tensor) else [
            (axis, d) for axis, d in enumerate(contract.dims) if d.symbol is not None and value.shape[axis] > 1]
        shapes.append({axis: _dim(d, dims) for axis, d in free} or None)
    return tuple(shapes) if dims else None


def _check_identical(program: ExportedProgram, compiled: Any, inputs: tuple[Any, ...]) -> None:
    """Bit for bit on ``inputs``; dynamic int8 on engines whose kernels the plain ops follow only within float
    rounding (not ``BIT_EXACT_ENGINES``): at least ``CLOSE_FLOOR_DB`` of SQNR."""
    with torch.no_grad():
        expected, got = flat_tensors(compiled.graph_module(*inputs)), flat_tensors(program.module()(*inputs))
    if len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)):
        return
    opts = compiled.quant_options
    if opts is not None and opts.mode == "dynamic" and opts.runtime_engine not in BIT_EXACT_ENGINES:
        db = outputs_sqnr_db(expected, got)
        if db >= CLOSE_FLOOR_DB:
            log.info("the program agrees with the %s engine's dynamic int8 kernels within float rounding: %.0f dB",
                     opts.runtime_engine, db)
            return
    raise ExportError("the exported program does not reproduce the compiled model's outputs bit for bit on the "
                      "example inputs: use fxforge.save / fxforge.load, and report this with the model")


def _failing_node(exc: Exception) -> str:
    match = re.search(r"While executing %(\w+)", str(exc))
    return f" at node '{match.group(1)}'" if match else ""


def export_program(compiled: Any, example_inputs: Any = None, *, dynamic: bool = True) -> ExportedProgram:
    """``compiled``'s lowered graph as an ExportedProgram, checked bit for bit on the example inputs (default:
    random inputs of the compiled shapes). ``dynamic=False`` fixes every dim at the example's size."""
    gm, _ = unpack_linears(compiled.graph_module, dynamic_linear)  # dynamic int8 linears on plain tensors
    check_exportable(gm)
    inputs = synthetic_inputs(gm) if example_inputs is None else graph_inputs(compiled.signature, example_inputs)
    shapes = dynamic_shapes(compiled.signature, inputs) if dynamic else None
    try:
        program = torch.export.export(gm, tuple(inputs), strict=False, dynamic_shapes=shapes)
    except ExportError:  # a runtime module's export form refusing, with what to do
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"torch.export failed on the compiled graph{_failing_node(exc)} ({type(exc).__name__}: "
                          f"{first}). dynamic=False exports fixed shapes; fxforge.save keeps every target") from exc
    _check_identical(program, compiled, inputs)
    log.debug("exported %d input(s), dynamic dims: %s", len(inputs), shapes)
    return program

"""The torch.export front end: capture with ``torch.export.export(strict=False)``, then hand the passes the
graph form they speak.

Rewrites of the exported program (``ep.module()``, aten ops at the level torch dispatches them, before
decompositions):
- Each call of a module whose type the op table names (``nn.Linear``, ``nn.Conv*``, ``nn.LayerNorm``,
  ``nn.BatchNorm*``, activations, dropout...), ``nn.Embedding`` or transformers' ``Conv1D`` becomes one
  ``call_module`` of that module again (the model's own object, from a private copy), when its region of aten
  nodes (found by ``node.meta["nn_module_stack"]``) reads one tensor from outside and produces one, its
  constants being that module's own parameters. Correct because the region is that module's forward, and
  the module is called on the same input. Regions that do not fit (several inputs or outputs, a weight
  read from elsewhere) keep their aten nodes, which the op table also spells.
  Why modules rather than teaching every pass the aten forms: fusion, int8 quantization (static and
  dynamic), to-nhwc and the lowerings all work on modules with their weights attached; with modules the
  exported BERT / GPT-2 graphs lower exactly like a symbolically traced model, with no second rule set.
- Export's bookkeeping goes: the ``_guards_fn`` shape guard (the ``CallSignature`` checks shapes on every
  call, with messages that say what to do) and ``aten._assert_tensor_metadata`` (it asserts what the shape
  contract checks at the entry), and casts that change nothing (``.to(float32)`` of a float32 tensor).
  Dropout (``aten.dropout(x, p, False)``) stays for remove-noops.
- A dataclass the model returns (export cannot flatten it) is registered as a pytree node, and export
  retried.
- The graph takes the call's tensors positionally and returns its output leaves; the pytree specs go to the
  ``CallSignature`` (plain codegen: every pass, ShapeProp and the serializers see an ordinary graph).
Preconditions: eval mode; the model is a private copy (its submodules move into the graph module).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import Dim
from torch.utils._sympy.numbers import int_oo

from fxforge.graph.ops import module_op

from .signature import CallSignature, Dimension, TensorContract

log = logging.getLogger(__name__)

# dynamic=: True (batch and sequence dims of every input), False (all static), or {input: {axis: name}}
DynamicSpec = bool | Mapping[str, Mapping[int, str]] | None

_BOOKKEEPING = {torch.ops.aten._assert_tensor_metadata.default}
_aten = torch.ops.aten
_CASTS = {_aten.to.dtype, _aten.to.dtype_layout, _aten.to.device, _aten._to_copy.default, _aten.type_as.default}
_META_DROPPED = ("val", "tensor_meta", "example_value", "unbacked_bindings", "from_node")


@dataclass
class ExportResult:
    gm: fx.GraphModule
    signature: CallSignature
    collapsed: int  # module calls turned back into call_module


def _single_tensor_modules() -> tuple[type, ...]:
    """Module types (besides those the op table names) whose forward maps one tensor to one tensor."""
    extra: list[type] = [nn.Embedding]
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")  # only when the model uses transformers
    if pytorch_utils is not None and hasattr(pytorch_utils, "Conv1D"):
        extra.append(pytorch_utils.Conv1D)
    return tuple(extra)


def _atomic(module: nn.Module) -> bool:
    return module_op(module) is not None or type(module) in _single_tensor_modules()


def default_axes(value: torch.Tensor) -> dict[int, str]:
    """The dims users expect to vary: batch (dim 0) and, for 2-D/3-D inputs (tokens, features over time), the
    sequence (dim 1)."""
    axes = {0: "batch"} if value.dim() >= 1 else {}
    if value.dim() in (2, 3):
        axes[1] = "seq"
    return axes


def _dynamic_shapes(call: dict[str, Any], dynamic: DynamicSpec) -> dict[str, Any] | None:
    """export's dynamic_shapes for the call: Dim.DYNAMIC where the user named dims (the names are the user's
    labels; export's own symbols and ranges go to the report), else Dim.AUTO on the default axes (export keeps
    them symbolic where the model allows, specializes elsewhere; the report says which)."""
    if dynamic is False:
        return None
    named = {} if dynamic is None or dynamic is True else dynamic

    def spec(name: str, value: Any) -> Any:
        if name in named:  # must stay dynamic (export fails if the model fixes it); export finds the range
            axes = named[name]
            return pytree.tree_map(lambda t: dict.fromkeys(axes, Dim.DYNAMIC)
                                   if isinstance(t, torch.Tensor) else None, value)
        if named:  # the user named some inputs: the others are static
            return pytree.tree_map(lambda t: None, value)
        # a size-1 example dim would be specialized anyway (export's 0/1 rule): left static, said so
        return pytree.tree_map(lambda t: {a: Dim.AUTO for a in default_axes(t) if t.shape[a] != 1}
                               if isinstance(t, torch.Tensor) else None, value)

    return {name: spec(name, value) for name, value in call.items()}


def export_model(model: nn.Module, call: dict[str, Any], parameters: inspect.Signature,
                 dynamic: DynamicSpec) -> ExportResult:
    """Export ``model(**call)`` (``call`` bound by name to ``parameters``) into a GraphModule of modules and aten
    ops, with the signature that maps user calls onto it. Raises what torch.export raises."""
    shapes = _dynamic_shapes(call, dynamic)
    try:
        ep = torch.export.export(model, (), call, strict=False, dynamic_shapes=shapes)
    except RuntimeError as exc:
        if "is not a known type" not in str(exc) or not _register_output_dataclasses(model, call):
            raise
        ep = torch.export.export(model, (), call, strict=False, dynamic_shapes=shapes)
    gm = ep.module()
    info = gm.graph._codegen.pytree_info
    leaves = pytree.tree_leaves(call)
    _inline_constant_inputs(gm)
    contracts = _contracts(gm, ep)
    signature = CallSignature(parameters, pytree.tree_flatten(call)[1], leaves, contracts, info.out_spec,
                              _specialized(contracts, call))
    gm.graph._codegen = fx.graph.CodeGen()
    _drop_bookkeeping(gm)
    _drop_noop_casts(gm)
    collapsed = sum(_collapse(gm, model, key, nodes) for key, nodes in _module_regions(gm, model).items())
    for node in gm.graph.nodes:
        for key in _META_DROPPED:
            node.meta.pop(key, None)
    gm.graph.eliminate_dead_code()
    plain = fx.GraphModule(gm, gm.graph, type(model).__name__)  # holds only what the graph uses
    plain.train(model.training)
    log.debug("export: %d module calls kept as modules", collapsed)
    return ExportResult(plain, signature, collapsed)


def _register_output_dataclasses(model: nn.Module, call: dict[str, Any]) -> bool:
    """Register the dataclasses the model returns as pytree nodes (export flattens outputs; a dataclass needs
    registering once per process). True when there were any to register."""
    with torch.no_grad():
        output = model(**call)
    found: set[type] = set()

    def visit(value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found.add(type(value))
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name))
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(output)
    new = [t for t in found if t not in pytree.SUPPORTED_NODES]
    for cls in new:
        torch.export.register_dataclass(cls)
        log.info("registered %s (a dataclass the model returns) as a pytree node for torch.export", cls.__name__)
    return bool(new)


def _contracts(gm: fx.GraphModule, ep: torch.export.ExportedProgram) -> list[TensorContract]:
    """Each graph input's dtype and dims: symbolic sizes (with export's ranges) or fixed ones."""
    ranges = {str(sym): r for sym, r in ep.range_constraints.items()}
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta["val"]
        dims = []
        for size in val.shape:
            if isinstance(size, torch.SymInt) and str(size.node.expr) in ranges:
                r = ranges[str(size.node.expr)]
                high = None if r.upper == int_oo else int(r.upper)
                dims.append(Dimension(symbol=str(size.node.expr), low=int(r.lower), high=high))
            else:
                dims.append(Dimension(size=int(size)))  # a derived expression is hinted; kept static
        out.append(TensorContract(node.name, val.dtype, tuple(dims)))
    return out


def _inline_constant_inputs(gm: fx.GraphModule) -> None:
    """Non-tensor inputs (``use_cache=False``) were specialized by export: their placeholders go, their
    readers get the value (the CallSignature checks that calls pass the same one)."""
    for node in list(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            for user in list(node.users):
                user.replace_input_with(node, value)
            gm.graph.erase_node(node)


def _specialized(contracts: list[TensorContract], call: dict[str, Any]) -> list[str]:
    lines = [f"{c.name}: ({', '.join(map(str, c.dims))})" for c in contracts]
    fixed = [f"{k}={v!r}" for k, v in call.items()
             if v is not None and not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))]
    return lines + ([f"fixed arguments: {', '.join(fixed)}"] if fixed else [])


def _drop_bookkeeping(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn" \
                or node.op == "call_function" and node.target in _BOOKKEEPING:
            gm.graph.erase_node(node)


def _drop_noop_casts(gm: fx.GraphModule) -> None:
    """``x.to(dtype)`` where x already has that dtype, device and strides returns x itself (copy=False): the
    call goes. Export records such casts with the dtype spelled out (``.to(x.dtype)`` becomes ``.to(float32)``),
    which would pin a bf16 lowering's activations to fp32."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CASTS or node.kwargs.get("copy") \
                or node.kwargs.get("memory_format") is not None or not isinstance(node.args[0], fx.Node):
            continue
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype \
                and src.device == out.device and src.stride() == out.stride():
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _module_regions(gm: fx.GraphModule, model: nn.Module) -> dict[str, list[fx.Node]]:
    """Call key -> the nodes of that call, for calls of atomic modules (outermost atomic call wins)."""
    regions: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            module = _submodule(model, path)
            if module is not None and path and _atomic(module):
                regions.setdefault(key, []).append(node)
                break
    return regions


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _collapse(gm: fx.GraphModule, model: nn.Module, key: str, nodes: list[fx.Node]) -> bool:
    """One module call's aten nodes -> ``call_module`` of that module, when it reads one tensor (besides its
    own parameters and sizes) and one of its nodes is read outside."""
    path = next(p for k, (p, _) in nodes[0].meta["nn_module_stack"].items() if k == key)
    module = model.get_submodule(path)
    inside = set(nodes)
    own = {f"{path}.{name}" for name, _ in module.named_parameters()} | \
          {f"{path}.{name}" for name, _ in module.named_buffers()}
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    # sizes read from outside (export hoists sym_size calls) are the module input's own: it recomputes them
    tensors = [a for a in inputs if not (a.op == "get_attr" and str(a.target) in own)
               and not isinstance(a.meta.get("val"), (torch.SymInt, int))]
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(tensors) != 1 or len(outputs) != 1 or any(n.op != "call_function" for n in nodes):
        return False
    if _submodule(gm, path) is not module:  # replaces export's container of the module's tensors
        gm.add_submodule(path, module)
    with gm.graph.inserting_before(outputs[0]):
        call = gm.graph.call_module(path, (tensors[0],))
    call.meta.update({k: v for k, v in outputs[0].meta.items() if k in ("nn_module_stack", "stack_trace")})
    outputs[0].replace_all_uses_with(call)
    for node in reversed(nodes):
        if not node.users:
            gm.graph.erase_node(node)
    return True

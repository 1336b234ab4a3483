"""Storing a compiled GraphModule so that it loads without re-tracing and without the user's classes.

torch.fx's own pickling stores a GraphModule as its generated Python code and re-traces that code on load,
dropping every ``node.meta`` (provenance, qparam buffers, module paths). Here a graph is stored as data
instead: one ``NodeRecord`` per node (op, target, arguments, a cleaned copy of its meta) plus a dict of the
objects its ``call_module`` / ``get_attr`` nodes use, and rebuilt with ``fx.GraphModule(attrs, graph)``.

What the stored objects may refer to is checked, not hoped for: torch and fxforge classes and functions
(plus Python's builtins). The compiled graph holds no user class after tracing, except submodules the
tracer kept whole (leaves); those are converted to a ``PortableModule`` (a ``torch.export`` program, or
TorchScript when export fails, e.g. on data-dependent control flow). Meta entries that name user classes
(``nn_module_stack``) keep the class's qualified name as text. Function targets are stored by name
(``FnRef``), a ``get_attr`` of a module's attribute with its owner module (a ``PackedWeight`` keeps its
engine), and ``check_records`` refuses, in a loaded graph, any call outside ``allowlist``.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import pickle
import pickletools
import types
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxforge.errors import ArtifactError
from fxforge.graph.meta import fxmeta

from .allowlist import allowed_method, function_name, resolve_function

# Modules whose classes / functions a stored model may reference (checked in the pickle, see stored_globals).
ALLOWED_ROOTS = ("torch", "fxforge", "builtins", "__builtin__", "collections", "operator", "_operator", "math",
                 "copyreg", "_codecs", "typing")
_META_KEYS = ("tensor_meta", "type", "nn_module_stack", "fxforge")  # what analyses after loading read


@dataclass(frozen=True)
class NodeRef:
    """A reference to an earlier node of the stored graph, by name."""

    name: str


@dataclass(frozen=True)
class OpRef:
    """A ``torch.ops`` operator by its qualified name ("quantized::conv2d" or "quantized::conv2d.default")."""

    qualified: str

    def resolve(self) -> Any:
        namespace, _, name = self.qualified.partition("::")
        packet_name, _, overload = name.partition(".")
        try:
            packet = getattr(getattr(torch.ops, namespace), packet_name)
            return getattr(packet, overload) if overload else packet
        except (AttributeError, RuntimeError) as exc:
            raise ArtifactError(f"the saved model calls torch.ops.{namespace}.{name}, which this torch build lacks: "
                                f"load it with the torch version it was saved with (see fxforge.read_metadata(path))"
                                ) from exc


@dataclass(frozen=True)
class FnRef:
    """A Python function a ``call_function`` node calls, by name ('torch:relu', 'operator:add')."""

    name: str

    def resolve(self) -> Any:
        try:
            return resolve_function(self.name)
        except LookupError:
            raise ArtifactError(f"the saved model calls {self.name}, which is not a torch, operator or fxforge "
                                f"function this process has: refusing to load it") from None


@dataclass(frozen=True)
class FormatRef:
    """A ``torch.memory_format`` (they do not pickle) by name: "channels_last", "contiguous_format"."""

    name: str

    def resolve(self) -> torch.memory_format:
        return getattr(torch, self.name)


@dataclass(frozen=True)
class EllipsisRef:
    """``...`` in an indexing argument (``x[:, ..., 0]``): Ellipsis pickles as a global no allowlist can name."""

    def resolve(self) -> Any:
        return Ellipsis


@dataclass(frozen=True)
class NodeRecord:
    name: str
    op: str
    target: Any
    args: tuple
    kwargs: dict
    meta: dict


def _from_allowed_module(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "") or "").split(".")[0] in ALLOWED_ROOTS


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _walk(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied inside dicts, lists, tuples and namedtuples (TensorMetadata)."""
    if isinstance(value, dict):
        return type(value)((k, _walk(v, leaf)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_walk(v, leaf) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, leaf) for v in value)
    return leaf(value)


def _clean_leaf(value: Any) -> Any:
    """Classes from outside torch/fxforge become their qualified name (text); memory formats a FormatRef,
    ``...`` an EllipsisRef."""
    if value is Ellipsis:
        return EllipsisRef()
    if isinstance(value, type):
        return value if _from_allowed_module(value) else _qualified_name(value)
    return FormatRef(str(value).removeprefix("torch.")) if isinstance(value, torch.memory_format) else value


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return NodeRef(value.name)
    if isinstance(value, torch._ops.OpOverloadPacket):
        return OpRef(value._qualified_op_name)
    if isinstance(value, torch._ops.OpOverload):
        return OpRef(f"{value._schema.name}.{value._overloadname}")
    if callable(value) and not isinstance(value, (type, nn.Module, torch.Tensor)):
        name = function_name(value)
        if name is not None:
            return FnRef(name)
    return _clean_leaf(value)


def graph_records(gm: fx.GraphModule) -> list[NodeRecord]:
    """The graph of ``gm`` as data (see the module docstring)."""
    records = []
    for node in gm.graph.nodes:
        meta = {k: _walk(node.meta[k], _clean_leaf) for k in _META_KEYS if k in node.meta}
        records.append(NodeRecord(node.name, node.op, _encode(node.target),
                                  fx.node.map_aggregate(node.args, _encode),
                                  fx.node.map_aggregate(node.kwargs, _encode), meta))
    return records


def graph_attrs(gm: fx.GraphModule) -> dict[str, Any]:
    """Qualified name -> object for everything the graph's ``call_module`` and ``get_attr`` nodes use, and
    the graph module's own buffers (qparams that lowered kernels took as literals, read by recalibrate).
    A ``get_attr`` of a submodule's attribute ("_packed_0.packed") is stored as its owner module, which knows
    how to rebuild it (a prepacked weight under its own engine)."""
    attrs: dict[str, Any] = dict(gm.named_buffers(recurse=False))
    for node in gm.graph.nodes:
        target = str(node.target)
        owner = target.rpartition(".")[0] if node.op == "get_attr" else ""
        if owner and isinstance(_fetch(gm, owner), nn.Module):
            attrs[owner] = _fetch(gm, owner)
        elif node.op in ("call_module", "get_attr"):
            attrs[target] = _fetch(gm, target)
    return attrs


def _fetch(root: Any, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _resolved_attrs(graph: fx.Graph, attrs: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` plus every node target found inside a stored owner module (see ``graph_attrs``)."""
    out = dict(attrs)
    for node in graph.nodes:
        target = str(node.target)
        if node.op in ("call_module", "get_attr") and target not in out:
            owner, _, field = target.rpartition(".")
            if owner not in attrs:
                raise ArtifactError(f"the stored graph uses '{target}', which the file does not hold")
            out[target] = getattr(attrs[owner], field)
    return out


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, NodeRef):
        return env[value.name]
    return value.resolve() if isinstance(value, (OpRef, FnRef, FormatRef, EllipsisRef)) else value


def rebuild(records: list[NodeRecord], attrs: dict[str, Any], class_name: str = "CompiledGraph") -> fx.GraphModule:
    """A GraphModule from ``graph_records`` and ``graph_attrs`` output: no tracing, meta kept, in eval mode."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for r in records:
        args = fx.node.map_aggregate(r.args, lambda a: _decode(a, env))
        kwargs = fx.node.map_aggregate(r.kwargs, lambda a: _decode(a, env))
        node = graph.create_node(r.op, _decode(r.target, env), args, kwargs, name=r.name)
        node.meta.update(_walk(r.meta, lambda v: v.resolve() if isinstance(v, FormatRef) else v))
        env[r.name] = node
    gm = fx.GraphModule(_resolved_attrs(graph, attrs), graph, class_name)
    for name, value in attrs.items():  # fx copies only what nodes use: add the graph module's own buffers
        if "." not in name and isinstance(value, torch.Tensor) and not hasattr(gm, name):
            gm.register_buffer(name, value)
        elif isinstance(value, nn.Module) and gm.get_submodule(name) is not value:  # fx made a plain holder
            gm.set_submodule(name, value)
    return gm.eval()


_NODE_OPS = frozenset({"placeholder", "get_attr", "call_function", "call_method", "call_module", "output"})


def _call_refused(r: NodeRecord) -> str | None:
    """Why a loaded graph may not make record ``r``'s call, or None (see ``allowlist``)."""
    if r.op not in _NODE_OPS:
        return f"unknown node op {r.op!r}"
    if r.op == "call_function" and not isinstance(r.target, (OpRef, FnRef)):
        return f"a call of {type(r.target).__name__} {r.target!r}"
    if r.op == "call_method" and not allowed_method(r.target):
        return f"a call of method {r.target!r}, which is not a public torch.Tensor method"
    if r.op in ("call_module", "get_attr", "placeholder", "output") and not isinstance(r.target, str):
        return f"a {r.op} node whose target is a {type(r.target).__name__}"
    if r.target == FnRef("builtins:getattr") and not (len(r.args) == 2 and isinstance(r.args[1], str)
                                                     and not r.args[1].startswith("_")):
        return f"getattr with arguments {r.args[1:]!r}"
    return None


def check_records(records: Any) -> list[NodeRecord]:
    """``records`` read from a file, refused (ArtifactError) unless every node is one a compiled graph makes."""
    if not isinstance(records, list) or not all(isinstance(r, NodeRecord) for r in records):
        raise ArtifactError("the stored graph is not a list of node records")
    for r in records:
        reason = _call_refused(r)
        if reason is not None:
            raise ArtifactError(f"the stored graph's node '{r.name}' makes {reason}: refusing to load it")
    return records


def copy_graph_module(gm: fx.GraphModule, replace: dict[str, Any] | None = None) -> fx.GraphModule:
    """A new GraphModule over the same objects (modules, buffers), with ``replace`` swapping some of them."""
    attrs = {**graph_attrs(gm), **(replace or {})}
    return rebuild(graph_records(gm), attrs, type(gm).__name__)


def user_module_paths(gm: fx.GraphModule) -> list[str]:
    """Paths of the called submodules whose class is not torch's or fxforge's (leaves kept by the tracer)."""
    paths = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and not _from_allowed_module(type(gm.get_submodule(str(node.target)))):
            paths.append(str(node.target))
    return list(dict.fromkeys(paths))


def synthetic_inputs(gm: fx.GraphModule) -> tuple[Any, ...]:
    """Random inputs with the shapes and dtypes the graph was compiled for (from its placeholders' meta)."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or fxmeta(node).get("bound"):
            continue
        tm = node.meta.get("tensor_meta")
        if tm is None:
            raise ArtifactError(f"input '{node.target}' has no recorded shape: pass example_inputs=")
        g = torch.Generator().manual_seed(0)
        inputs.append(torch.randn(tm.shape, generator=g).to(tm.dtype) if tm.dtype.is_floating_point
                      else torch.zeros(tm.shape, dtype=tm.dtype))
    return tuple(inputs)


class _ArgsCapture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, targets: set[str]) -> None:
        super().__init__(gm)
        self.targets, self.args = targets, {}

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in self.targets and target not in self.args:
            self.args[target] = (args, kwargs)
        return super().call_module(target, args, kwargs)


def module_inputs(gm: fx.GraphModule, inputs: tuple, targets: set[str]) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each submodule in ``targets`` is first called with when ``gm`` runs on ``inputs``."""
    interp = _ArgsCapture(gm, targets)
    with torch.no_grad():
        interp.run(*inputs)
    return interp.args


_TRUSTED = contextvars.ContextVar("fxforge_trusted_payload", default=True)


@contextlib.contextmanager
def payload_trust(trusted: bool) -> Iterator[None]:
    """While active, PortableModules unpickle only when ``trusted``: torch.export and TorchScript loaders
    unpickle with code execution allowed, so a file from elsewhere must not reach them unasked."""
    token = _TRUSTED.set(trusted)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


class PortableModule(nn.Module):
    """A user submodule stored without its class: a ``torch.export`` program or a TorchScript module.

    Pickles as the serialized program (bytes) and loads it back on unpickling, which ``fxforge.load`` allows
    only with ``trusted=True`` (``payload_trust``): both torch loaders run pickled code.
    """

    def __init__(self, kind: str, payload: bytes, original: str) -> None:
        super().__init__()
        self.kind, self.payload, self.original = kind, payload, original
        self._load()

    def _load(self) -> None:
        buffer = io.BytesIO(self.payload)
        program = torch.export.load(buffer).module() if self.kind == "export" else torch.jit.load(buffer)
        self.__dict__["program"] = program  # not a submodule: it is stored as ``payload``

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("program", None)
        return state

    def __setstate__(self, state: dict) -> None:
        if not _TRUSTED.get():
            raise ArtifactError(f"the file holds submodule {state.get('original')!r} as a {state.get('kind')} "
                                f"program, whose torch loader runs code from the file: load it with "
                                f"fxforge.load(path, trusted=True) only if you trust where the file came from")
        if state.get("kind") not in ("export", "torchscript") or not isinstance(state.get("payload"), bytes):
            raise ArtifactError("a stored portable submodule is neither a torch.export nor a TorchScript program")
        super().__setstate__(state)
        self._load()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.kind}, was {self.original}"

    @classmethod
    def convert(cls, module: nn.Module, args: tuple, kwargs: dict) -> PortableModule:
        """``torch.export`` first (the maintained path); TorchScript scripting for control flow export rejects."""
        errors = []
        for kind, make in (("export", _exported), ("torchscript", _scripted)):
            try:
                return cls(kind, make(module, args, kwargs), _qualified_name(type(module)))
            except Exception as exc:  # each converter fails in its own ways; keep the reasons for the error
                errors.append(f"{kind}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
        raise ArtifactError("; ".join(errors))


def _exported(module: nn.Module, args: tuple, kwargs: dict) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, args, kwargs or None), buffer)
    return buffer.getvalue()


def _scripted(module: nn.Module, args: tuple, kwargs: dict) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def portable_leaves(gm: fx.GraphModule, inputs: tuple, convert: Callable = PortableModule.convert
                    ) -> dict[str, nn.Module]:
    """path -> PortableModule for every user-class submodule ``gm`` calls; ArtifactError says which failed."""
    paths = user_module_paths(gm)
    if not paths:
        return {}
    captured = module_inputs(gm, inputs, set(paths))
    out = {}
    for path in paths:
        module = gm.get_submodule(path)
        args, kwargs = captured.get(path, ((), {}))
        try:
            out[path] = convert(module, args, kwargs)
        except ArtifactError as exc:
            raise ArtifactError(
                f"submodule '{path}' ({_qualified_name(type(module))}) was kept whole by the tracer and cannot be "
                f"stored without its class ({exc}). Make it traceable (then compile again), or make it work "
                f"with torch.export (no Python control flow on tensor values)") from None
    return out


def stored_graph(records: list[NodeRecord], attrs: dict[str, Any], class_name: str) -> fx.GraphModule:
    """A graph module held by a stored module (a runtime module wrapping the lowered graph), rebuilt from
    data as the top-level graph is; the one function a payload may call while loading."""
    return rebuild(check_records(records), attrs, str(class_name))


class _GraphsAsData(pickle.Pickler):
    """Pickles graph modules nested in stored modules as ``stored_graph`` data: torch.fx's own pickling stores
    generated Python code and runs it on load."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, fx.GraphModule):
            return stored_graph, (graph_records(obj), graph_attrs(obj), type(obj).__name__)
        return NotImplemented


_PICKLE = types.SimpleNamespace(__name__="fxforge_graphs_as_data", Pickler=_GraphsAsData)
SAFE_FUNCTIONS: tuple[Callable, ...] = (stored_graph,)  # what a payload may call besides torch's rebuilders


def payload_bytes(state: dict[str, Any]) -> bytes:
    """``torch.save`` of ``state`` (graphs as data), for ``torch.load(weights_only=True)`` and SAFE_FUNCTIONS."""
    buffer = io.BytesIO()
    torch.save(state, buffer, pickle_module=_PICKLE)
    return buffer.getvalue()


def stored_globals(torch_save_bytes: bytes) -> set[str]:
    """'module.name' of every class or function a ``torch.save`` payload refers to (its pickle's GLOBALs)."""
    with zipfile.ZipFile(io.BytesIO(torch_save_bytes)) as archive:
        pickle_bytes = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(pickle_bytes):
        if opcode.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def foreign_globals(torch_save_bytes: bytes) -> list[str]:
    """The references of a ``torch.save`` payload outside ALLOWED_ROOTS: what loading it would import."""
    return sorted(g for g in stored_globals(torch_save_bytes) if g.split(".")[0] not in ALLOWED_ROOTS)

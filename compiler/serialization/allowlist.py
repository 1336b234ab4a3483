"""What a ``.fxf`` payload may build when loaded: exact classes and functions, never code from the file.

``fxforge.load`` unpickles with ``torch.load(weights_only=True)``, which builds tensors, containers and
primitives, plus only the classes named here (``torch.serialization.safe_globals``):
- ``torch.nn`` module classes (``torch.nn.modules``), the fx / torch value types graphs carry
  (``TensorMetadata``, ``immutable_dict``, ``TorchVersion``) and the builtin types ``node.meta["type"]`` names;
- fxforge's own classes: every ``nn.Module`` subclass and dataclass defined in an imported ``fxforge`` module
  (runtime modules of the backends, fused modules, observers, the report's records, the codec's refs).
Nothing is imported or called by name from the file. A class is rebuilt as pickle does (``__new__``, then
``__setstate__`` or its ``__dict__``), so a runtime module round-trips when its pickled state holds only
tensors, plain data and other such objects: opaque derived objects (prepacked weights) are dropped by
``__getstate__`` and rebuilt by ``__setstate__`` (docs/saving.md). ``fxforge.save`` checks this by loading
the payload back the same way before writing it.
Graph call targets are data too (``codec.FnRef``) and resolve only to ``allowed_function``s: torch's tensor
computations (``torch.overrides.get_overridable_functions``), ``operator`` / ``math``, ``getattr`` and
the functions of fxforge's compute packages (graph, quant, backends, passes).
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import functools
import inspect
import math
import operator
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

# the types node.meta["type"] records for non-tensor values, and slices (indexing arguments)
_BUILTIN_TYPES: tuple[type, ...] = (tuple, list, dict, int, float, bool, str, bytes, slice)
_TORCH_VALUE_TYPES: tuple[type, ...] = (fx.passes.shape_prop.TensorMetadata, fx.immutable_collections.immutable_dict,
                                        fx.immutable_collections.immutable_list, torch.torch_version.TorchVersion)


def _torch_module_classes() -> list[type]:
    return [cls for name in torch.nn.modules.__all__ if isinstance(cls := getattr(torch.nn.modules, name), type)
            and issubclass(cls, nn.Module)]


def _fxforge_classes() -> list[type]:
    """nn.Module subclasses and dataclasses defined in the fxforge modules imported so far."""
    found = []
    for name, module in list(sys.modules.items()):
        if name != "fxforge" and not name.startswith("fxforge."):
            continue
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == name and \
                    (issubclass(value, nn.Module) or dataclasses.is_dataclass(value)):
                found.append(value)
    return found


def savable_classes() -> list[type]:
    """The exact classes a payload may construct (see the module docstring)."""
    return list(dict.fromkeys([*_BUILTIN_TYPES, *_torch_module_classes(), *_TORCH_VALUE_TYPES, *_fxforge_classes()]))


# fxforge packages whose functions a lowered graph may call (dynamic_quantize, ...): they compute on tensors,
# unlike the ones that write files (pipeline dumps, viz, artifact, cli)
_COMPUTE_PACKAGES = ("fxforge.graph.", "fxforge.quant.", "fxforge.backends.", "fxforge.passes.")


def needed(candidates: list[Any], referenced: set[str]) -> list[Any]:
    """The ``candidates`` a pickle references by name ('module.qualname', as ``codec.stored_globals`` lists
    them): torch's weights-only unpickler scans its allowlist on every lookup, so it is kept to these.
    Protocol-2 pickles spell builtins the Python 2 way (``int`` is '__builtin__.long'): mapped back here."""
    names = {_python3_name(ref) for ref in referenced}
    return [obj for obj in candidates if f"{obj.__module__}.{obj.__qualname__}" in names]


def _python3_name(ref: str) -> str:
    module, _, name = ref.rpartition(".")
    if module != "__builtin__":
        return ref
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), ("builtins", name))
    return f"{module}.{name}"


@functools.cache
def _tensor_functions() -> frozenset[Any]:
    overridable = torch.overrides.get_overridable_functions()
    return frozenset(f for functions in overridable.values() for f in functions if callable(f))


def allowed_function(fn: Callable) -> bool:
    """Whether a graph may call ``fn`` (a call_function target) after loading."""
    if fn is getattr or inspect.isclass(fn):
        return fn is getattr
    module = str(getattr(fn, "__module__", None) or "")
    if module in ("_operator", "operator", "math"):
        return getattr(operator if module != "math" else math, fn.__name__, None) is fn
    if module.startswith(_COMPUTE_PACKAGES):
        return True
    try:
        return fn in _tensor_functions()
    except TypeError:  # unhashable
        return False


def function_name(fn: Callable) -> str | None:
    """'module:qualified.name' that ``resolve_function`` maps back to ``fn``; None when ``fn`` is not allowed
    or has no importable name."""
    if not allowed_function(fn):
        return None
    module = str(fn.__module__)
    module = {"_operator": "operator"}.get(module, module)
    qualname = str(getattr(fn, "__qualname__", fn.__name__))
    if qualname.startswith("_VariableFunctionsClass."):  # torch.relu and friends live on torch itself
        qualname = fn.__name__
    try:
        return f"{module}:{qualname}" if resolve_function(f"{module}:{qualname}") is fn else None
    except LookupError:
        return None


def resolve_function(name: str) -> Callable:
    """The allowed function ``name`` ('module:qualified.name') denotes; LookupError otherwise."""
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None or not qualname or any(part.startswith("__") for part in qualname.split(".")):
        raise LookupError(name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is None or not callable(obj) or not allowed_function(obj):
        raise LookupError(name)
    return obj


def allowed_method(name: Any) -> bool:
    """Whether a graph may call method ``name`` (a call_method target): public ``torch.Tensor`` methods."""
    return isinstance(name, str) and not name.startswith("_") and callable(getattr(torch.Tensor, name, None))

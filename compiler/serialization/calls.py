"""A compiled model's call signature (``capture.signature.CallSignature``) as plain JSON data, for ``.fxf`` files.

A loaded model takes the calls the compiled one took (``model(**batch)``), returns the same structure
(``ModelOutput``, dataclass, dict, tuple) and checks the same shape contract, so all of the signature is
stored: forward's parameter names and kinds, the pytree specs of the call and of the outputs, the fixed
non-tensor arguments and each input's contract. Nothing is unpickled: a pytree node type is stored as
``module`` + ``qualname`` and rebuilt only when it is a builtin container (tuple, list, dict, OrderedDict)
or a dataclass (``ModelOutput`` subclasses are dataclasses) or namedtuple class found under that name in
that module. That module is imported only when its top-level package already is (``import transformers``
before loading a model that returns its outputs): a file cannot make load import a library. Any other
type, a context or a fixed argument that is not plain data makes ``save`` refuse with ``ArtifactError``
rather than write a file that loads otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import json
import sys
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxforge.capture.signature import CallSignature, Dimension, TensorContract
from fxforge.errors import ArtifactError

_CONTAINERS: dict[str, type] = {"builtins:tuple": tuple, "builtins:list": list, "builtins:dict": dict,
                                "collections:OrderedDict": collections.OrderedDict}
_CONSTANTS = (type(None), bool, int, float, str)
_KIND = type(inspect.Parameter.POSITIONAL_ONLY)


class _Default:
    """A parameter default as saved: only its text (a call that omits the argument binds without it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def signature_to_data(signature: CallSignature) -> dict[str, Any]:
    """``signature`` as JSON data; ArtifactError when part of it cannot be stored as data."""
    data = {"parameters": [_parameter_to_data(p) for p in signature.parameters.parameters.values()],
            "in_spec": _spec_to_data(signature.in_spec), "out_spec": _spec_to_data(signature.out_spec),
            "leaves": [_leaf_to_data(leaf) for leaf in signature.leaves],
            "contracts": [None if c is None else _contract_to_data(c) for c in signature.contracts],
            "specialized": list(signature.specialized)}
    data = json.loads(json.dumps(data))  # what load will read
    back = signature_from_data(data)
    if back.in_spec != signature.in_spec or back.out_spec != signature.out_spec:
        raise ArtifactError("the compiled model's call signature does not survive being stored as data (a pytree "
                            "context that is not plain data): fxforge.save cannot keep how it is called")
    return data


def signature_from_data(data: Any) -> CallSignature:
    """The CallSignature ``signature_to_data`` stored; ArtifactError when the data is damaged or names a type
    that is not allowed (see the module docstring)."""
    try:
        return CallSignature(inspect.Signature([_parameter_from_data(p) for p in data["parameters"]]),
                             _spec_from_data(data["in_spec"]), [_leaf_from_data(leaf) for leaf in data["leaves"]],
                             [None if c is None else _contract_from_data(c) for c in data["contracts"]],
                             _spec_from_data(data["out_spec"]), [str(s) for s in data["specialized"]])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"the saved call signature (fxforge.json 'signature') is damaged ({type(exc).__name__}: "
                            f"{exc}): save the model again") from None


def _parameter_to_data(parameter: inspect.Parameter) -> dict[str, Any]:
    default = None if parameter.default is inspect.Parameter.empty else repr(parameter.default)
    return {"name": parameter.name, "kind": int(parameter.kind), "default": default}


def _parameter_from_data(data: dict[str, Any]) -> inspect.Parameter:
    default = inspect.Parameter.empty if data["default"] is None else _Default(str(data["default"]))
    return inspect.Parameter(str(data["name"]), _KIND(int(data["kind"])), default=default)


def _spec_to_data(spec: pytree.TreeSpec | None) -> Any:
    if spec is None:
        return None
    if spec.is_leaf():
        return "*"
    cls = spec.type
    context = None if _is_namedtuple(cls) else spec.context
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "context": context,
            "children": [_spec_to_data(child) for child in spec.children()]}


def _spec_from_data(data: Any) -> pytree.TreeSpec | None:
    if data is None:
        return None
    if data == "*":
        return pytree.treespec_leaf()
    cls = node_type(str(data["type"]))
    context = cls if _is_namedtuple(cls) else data["context"]
    return pytree.TreeSpec(cls, context, [_spec_from_data(child) for child in data["children"]])


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def node_type(name: str) -> type:
    """The pytree node type stored as 'module:qualname': a builtin container, or a dataclass / namedtuple
    class of that module (registered as a pytree node if it is not yet). ArtifactError otherwise."""
    if name in _CONTAINERS:
        return _CONTAINERS[name]
    module_name, _, qualname = name.partition(":")
    if not qualname or any(part.startswith("_") for part in qualname.split(".")):
        raise ArtifactError(f"the saved call signature names the type {name!r}, which fxforge.load does not rebuild")
    root = module_name.partition(".")[0]
    if root not in sys.modules:
        raise ArtifactError(f"the model returns {qualname} from {module_name}, and {root} is not imported: "
                            f"import {root} before fxforge.load (load imports no library a file names)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArtifactError(f"the model returns {qualname} from {module_name}, which cannot be imported here "
                            f"({exc})") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type) or not (dataclasses.is_dataclass(obj) or _is_namedtuple(obj)):
        raise ArtifactError(f"the saved call signature names {name!r}, which is not a dataclass or namedtuple "
                            f"class there: fxforge.load rebuilds only those (and tuple, list, dict)")
    if obj not in pytree.SUPPORTED_NODES and dataclasses.is_dataclass(obj):
        torch.export.register_dataclass(obj)  # as the export front end did when the model was compiled
    return obj


def _leaf_to_data(leaf: Any) -> dict[str, Any]:
    if isinstance(leaf, torch.Tensor):
        return {"tensor": True}
    if type(leaf) not in _CONSTANTS:
        raise ArtifactError(f"the model was compiled for the fixed argument value {leaf!r} "
                            f"({type(leaf).__name__}); fxforge.save stores only None, bool, int, float and str "
                            f"there: compile with such a value (or a tensor) instead")
    return {"value": leaf}


def _leaf_from_data(data: dict[str, Any]) -> Any:
    if data.get("tensor"):
        return torch.empty(0)  # stands for a graph input (CallSignature.flatten only tests isinstance)
    value = data["value"]
    if type(value) not in _CONSTANTS:
        raise TypeError(f"fixed argument {value!r} is not plain data")
    return value


def _contract_to_data(contract: TensorContract) -> dict[str, Any]:
    dtype = None if contract.dtype is None else str(contract.dtype).removeprefix("torch.")
    return {"name": contract.name, "dtype": dtype, "dims": [dataclasses.asdict(d) for d in contract.dims]}


def _contract_from_data(data: dict[str, Any]) -> TensorContract:
    dtype = None if data["dtype"] is None else getattr(torch, str(data["dtype"]), None)
    if data["dtype"] is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {data['dtype']!r}")
    dims = tuple(Dimension(size=d["size"], symbol=d["symbol"], low=int(d["low"]), high=d["high"])
                 for d in data["dims"])
    return TensorContract(str(data["name"]), dtype, dims)

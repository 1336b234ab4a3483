"""How a compiled model is called: the user's ``(args, kwargs)`` -> the captured graph's flat tensor inputs,
its flat outputs -> the structure the model returns, and the shapes each input may take.

The captured graph (either front end) takes tensors positionally and returns what it computes; a
``CallSignature`` keeps everything else: the pytree specs of the inputs and outputs (so a ``ModelOutput``,
dataclass, dict or tuple comes back with its keys, and ``model(**batch)`` works), the non-tensor arguments the
model was specialized on, and the shape contract, checked on every call so that an input outside what was
compiled raises ``InputShapeError`` instead of computing a wrong answer.

Shape contract: each input dimension is static (must equal the example's size) or dynamic (a symbol with a
range; inputs that share a symbol must agree). ``symbolic`` front end: a torch.fx graph records no shapes, but
passes specialize on the example's (shape propagation), so only the dimensions named dynamic (by default the
batch dimension) may change; the torch.export front end makes exactly the dimensions export kept symbolic
dynamic.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxforge.errors import InputShapeError


@dataclass(frozen=True)
class Dimension:
    """One input dimension: a fixed ``size``, or a ``symbol`` whose size lies in ``[low, high]``."""

    size: int | None = None
    symbol: str | None = None
    low: int = 0
    high: int | None = None

    def __str__(self) -> str:
        if self.symbol is None:
            return str(self.size)
        return f"{self.symbol}[{self.low}..{'' if self.high is None else self.high}]"


@dataclass(frozen=True)
class TensorContract:
    """What an input tensor must look like: its dtype and, per dimension, a size or a symbol."""

    name: str
    dtype: torch.dtype | None  # None: any (the symbolic front end's graphs cast where they need to)
    dims: tuple[Dimension, ...]

    def describe(self) -> str:
        dtype = "" if self.dtype is None else " " + str(self.dtype).removeprefix("torch.")
        return f"{self.name}: ({', '.join(map(str, self.dims))}){dtype}"


@dataclass
class CallSignature:
    """The user's call <-> the graph's flat tensors, and the input shape contract."""

    parameters: inspect.Signature  # the model's forward: calls are bound to it by name
    # of the example call's bound arguments {name: value}; None: the graph takes the arguments as they are
    # (symbolic front end: positionally, lists unflattened)
    in_spec: pytree.TreeSpec | None
    leaves: list[Any]  # the example call's leaves: tensors stand for graph inputs, other values are fixed
    contracts: list[TensorContract | None]  # one per graph input (None: not checked)
    out_spec: pytree.TreeSpec | None = None  # None: the graph returns the model's own output structure
    specialized: list[str] = field(default_factory=list)  # what the capture fixed, for the report

    def flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The graph's inputs for the call ``model(*args, **kwargs)``, checked against the contract."""
        if self.in_spec is None:
            values = list(bind_call(self.parameters, args, kwargs).values())
            self.check(values)
            return values
        leaves, spec = pytree.tree_flatten(bind_call(self.parameters, args, kwargs))
        if spec != self.in_spec:
            raise InputShapeError(f"the model was compiled for calls with {self.describe_call()}; got arguments "
                                  f"structured as {spec}: call it the way it was compiled")
        tensors = []
        for got, expected in zip(leaves, self.leaves, strict=True):
            if isinstance(expected, torch.Tensor):
                tensors.append(got)
            elif not _same_constant(got, expected):
                raise InputShapeError(f"the model was compiled for the argument value {expected!r}, got {got!r}: "
                                      f"non-tensor arguments are fixed at compile time; compile again with it")
        self.check(tensors)
        return tensors

    def check(self, tensors: list[Any]) -> None:
        """Raise InputShapeError unless every input fits its contract (sizes, ranges, shared symbols)."""
        if self.in_spec is not None and len(tensors) != len(self.contracts):
            raise InputShapeError(f"the model takes {len(self.contracts)} tensor input(s) "
                                  f"({self.describe_call()}), got {len(tensors)}")
        symbols: dict[str, int] = {}
        for value, contract in zip(tensors, self.contracts, strict=False):
            if contract is not None:
                _check_tensor(value, contract, symbols)

    def unflatten(self, outputs: Any) -> Any:
        if self.out_spec is None:
            return outputs
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    def describe_call(self) -> str:
        return "; ".join(c.describe() for c in self.contracts if c is not None)


def bind_call(parameters: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name in forward-signature order (``**kwargs`` entries merged in), so positional
    and keyword spellings of one call flatten alike."""
    try:
        bound = parameters.bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise InputShapeError(f"the arguments do not fit forward{parameters}: {exc}") from exc
    out: dict[str, Any] = {}
    for name, value in bound.items():
        kind = parameters.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out.update({f"{name}_{i}": v for i, v in enumerate(value)})
        else:
            out[name] = value
    return out


def _same_constant(got: Any, expected: Any) -> bool:
    try:
        return bool(got == expected) and type(got) is type(expected)
    except Exception:  # an object whose == is not a bool
        return got is expected


def _check_tensor(value: Any, contract: TensorContract, symbols: dict[str, int]) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputShapeError(f"input '{contract.name}' must be a tensor ({contract.describe()}), "
                              f"got {type(value).__name__}")
    shape = tuple(value.shape)
    if contract.dtype not in (None, value.dtype) or len(shape) != len(contract.dims):
        raise InputShapeError(f"input '{contract.name}' has shape {shape} {value.dtype}; the model was compiled "
                              f"for {contract.describe()}")
    for axis, (size, dim) in enumerate(zip(shape, contract.dims, strict=True)):
        if dim.symbol is None and size != dim.size:
            fix = f"compile with dynamic={{'{contract.name}': {{{axis}: 'name'}}}} to let it vary"
            if dim.size == 1:
                fix += " and an example of size 2 or more there (torch.export fixes a size-1 example dimension)"
            raise InputShapeError(
                f"input '{contract.name}' has size {size} in dimension {axis}, compiled for exactly {dim.size} "
                f"({contract.describe()}): {fix}, or pass inputs of the compiled size")
        if dim.symbol is not None and (size < dim.low or (dim.high is not None and size > dim.high)):
            raise InputShapeError(f"input '{contract.name}' has size {size} in dimension {axis}, outside the "
                                  f"compiled range {dim} ({contract.describe()})")
        if dim.symbol is not None and symbols.setdefault(dim.symbol, size) != size:
            raise InputShapeError(f"input '{contract.name}' has size {size} in dimension {axis}, but another input "
                                  f"has {symbols[dim.symbol]} for the same dimension {dim.symbol}: they must agree")


def static_contract(name: str, example: torch.Tensor, dynamic_axes: dict[int, str]) -> TensorContract:
    """The contract of an input (any dtype) whose dims are fixed at the example's sizes except ``dynamic_axes`` (axis ->
    symbol name; any size there)."""
    dims = tuple(Dimension(symbol=dynamic_axes[a], low=0) if a in dynamic_axes else Dimension(size=s)
                 for a, s in enumerate(example.shape))
    return TensorContract(name, None, dims)


def example_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a call with example inputs in any form compile accepts: a dict is keyword
    arguments, a tuple or list positional ones, anything else (a tensor) the one argument."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def call_with(model: Any, example_inputs: Any) -> Any:
    """``model`` (eager or compiled) called with example inputs in any accepted form (``example_args``)."""
    args, kwargs = example_args(example_inputs)
    return model(*args, **kwargs)


def graph_inputs(signature: CallSignature | None, example_inputs: Any) -> tuple[Any, ...]:
    """The captured graph's flat inputs for a call with ``example_inputs``, checked against the contract;
    without a signature (a graph that takes the arguments as they are) the positional arguments."""
    args, kwargs = example_args(example_inputs)
    if signature is None:
        if kwargs:
            raise InputShapeError("this compiled model has no call signature: give its inputs positionally")
        return args
    return tuple(signature.flatten(args, kwargs))

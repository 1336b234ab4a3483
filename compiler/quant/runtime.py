"""The runtime modules backends put in place of reference quantized modules, for passes that time kernels.

A pass that chooses between a reference int8 module and another scheme by speed must time what will run, not the
reference (a Python loop that simulates the rounding). Backends register a factory per reference type
(``register_runtime``); the core imports no backend, and where none is registered ``runtime_for`` says so (None).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

RuntimeFactory = Callable[[nn.Module, str], nn.Module]  # (reference module, quantized engine) -> runtime module

_RUNTIMES: dict[type[nn.Module], RuntimeFactory] = {}


def register_runtime(reference_type: type[nn.Module], factory: RuntimeFactory) -> None:
    """Make ``factory(reference, engine)`` the runtime of ``reference_type`` modules."""
    _RUNTIMES[reference_type] = factory


def runtime_for(reference: nn.Module, engine: str) -> nn.Module | None:
    """The module a backend's lowering runs for ``reference`` on ``engine``, or None where none is registered."""
    factory = _RUNTIMES.get(type(reference))
    return None if factory is None else factory(reference, engine)

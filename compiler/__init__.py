"""fxforge: a torch.fx compiler for PyTorch models. ``fxforge.compile(model, target, example_inputs=...)``.

The public names live in ``fxforge.api`` and load on first use (PEP 562 ``__getattr__``), together with the
built-in passes, backends and viz, which register themselves: ``import fxforge`` alone does not import torch,
so the command line (``fxforge.cli``) answers ``--help`` at once.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__  # noqa: F401

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ below imports it
    from . import debug, numerics, testing  # noqa: F401
    from .api import *  # noqa: F403
    from .graph import patterns  # noqa: F401

# A library stays quiet unless its user configures logging: records of the "fxforge" logger (one INFO line per
# pass, WARNING when a compile degrades, DEBUG details) go nowhere until a handler is added (the CLI's -v does).
logging.getLogger(__name__).addHandler(logging.NullHandler())

# Public functions named like the module that defines them: importing that module (``fxforge.compile``) before
# the API has loaded must not make the module the package's attribute of that name.
SHADOWED = frozenset({"compile"})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _load() -> types.ModuleType:
    """Import ``fxforge.api`` (which imports the plugins) and copy its public names here; importing it also sets
    the submodules ``debug``, ``numerics`` and ``testing`` here. ``fxforge.patterns`` is ``fxforge.graph.patterns``."""
    api = importlib.import_module(".api", __name__)
    globals().update({name: getattr(api, name) for name in api.__all__}, __all__=api.__all__, patterns=api.patterns)
    return api


def __getattr__(name: str) -> Any:
    if name.startswith("__") and name != "__all__":  # dunder probes (copy, pickle, doctest) load nothing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load()
    if name in globals():
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_load().__all__})

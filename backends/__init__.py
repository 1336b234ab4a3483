"""Backends, one file each: a target's pipeline recipe, its lowering pass and its runtime modules."""

from . import cpu, cuda  # noqa: F401

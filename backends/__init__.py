"""Backends, one file each: a target's pipeline recipe, its lowering pass and its runtime modules."""

from . import cpu, cpu_bf16, cuda, int8, int8_lowering  # noqa: F401

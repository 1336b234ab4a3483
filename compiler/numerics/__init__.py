"""Numerics: comparing outputs (``metrics``: max absolute / relative error) and recording per-node values of a
run for layer-by-layer comparison (``provenance``), used by verification, the report and ``fxforge.debug``.
May import: ``quant``, ``graph``, ``errors``.
"""

from .metrics import max_errors

__all__ = ["max_errors"]

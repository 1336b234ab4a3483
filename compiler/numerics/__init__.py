"""Numerics: comparing outputs (``metrics``: max absolute / relative error) and recording per-node values of a
run for layer-by-layer comparison (``provenance``), used by verification, the report and ``fxforge.debug``; and
timing callables against each other (``timing``), for the measured kernel choices and the profitability check.
May import: ``quant``, ``graph``, ``errors``.
"""

from .metrics import max_errors

__all__ = ["max_errors"]

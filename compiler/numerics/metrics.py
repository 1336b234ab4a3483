"""Comparing outputs (tensors or nested tuples/lists/dicts of tensors).

Non-finite values are never hidden: an element where one side is NaN or infinite and the other is not (or is
the other infinity) makes the error ``inf``, which fails every tolerance check (``err <= tol`` is False). An
element where both sides hold the same non-finite value (NaN and NaN, +inf and +inf) agrees: a model whose
eager output is NaN there is reproduced, not broken.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from fxforge.quant.sqnr import same_values


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested tuple/list/dict) value, in pytree order."""
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _tensor_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |actual - expected|, that / max |expected|) of two float tensors of one shape; ``inf`` when a
    non-finite value disagrees (see the module docstring)."""
    if not expected.numel():
        return 0.0, 0.0
    a, e = actual.detach().double(), expected.detach().double()
    differ = ~same_values(a, e)
    if not (a[differ].isfinite().all() and e[differ].isfinite().all()):
        return math.inf, math.inf
    diff = (a[differ] - e[differ]).abs().max().item() if differ.any() else 0.0
    finite = e[e.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return diff, (diff / scale if scale > 0 else diff)


def max_errors(actual: Any, expected: Any) -> tuple[float, float]:
    """(max absolute error, max absolute error / max |expected|) over all floating-point outputs.

    Outputs that differ in structure or shape, and non-finite values on one side only, give (inf, inf).
    """
    worst_abs, worst_rel = 0.0, 0.0
    actual_tensors, expected_tensors = flat_tensors(actual), flat_tensors(expected)
    if len(actual_tensors) != len(expected_tensors):  # a different output structure: as wrong as it gets
        return math.inf, math.inf
    for a, e in zip(actual_tensors, expected_tensors, strict=True):
        if a.shape != e.shape:
            return math.inf, math.inf
        if not e.is_floating_point():
            mismatch = float(not torch.equal(a, e))
            worst_abs, worst_rel = max(worst_abs, mismatch), max(worst_rel, mismatch)
            continue
        abs_error, rel_error = _tensor_errors(a, e)
        worst_abs, worst_rel = max(worst_abs, abs_error), max(worst_rel, rel_error)
    return worst_abs, worst_rel

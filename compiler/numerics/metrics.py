"""Comparing outputs (tensors or nested tuples/lists/dicts of tensors)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested tuple/list/dict) value, in pytree order."""
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def max_errors(actual: Any, expected: Any) -> tuple[float, float]:
    """(max absolute error, max absolute error / max |expected|) over all floating-point outputs.

    Outputs that differ in structure or shape give (inf, inf).
    """
    worst_abs, worst_rel = 0.0, 0.0
    actual_tensors, expected_tensors = flat_tensors(actual), flat_tensors(expected)
    if len(actual_tensors) != len(expected_tensors):  # a different output structure: as wrong as it gets
        return float("inf"), float("inf")
    for a, e in zip(actual_tensors, expected_tensors, strict=True):
        if a.shape != e.shape:
            return float("inf"), float("inf")
        if not e.is_floating_point():
            mismatch = float(not torch.equal(a, e))
            worst_abs, worst_rel = max(worst_abs, mismatch), max(worst_rel, mismatch)
            continue
        diff = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
        scale = e.double().abs().max().item() if e.numel() else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    return worst_abs, worst_rel

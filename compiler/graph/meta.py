"""Per-node state lives in ``node.meta["fxforge"]`` (never as attributes on nodes or graphs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

KEY = "fxforge"


def fxmeta(node: fx.Node) -> dict[str, Any]:
    """The fxforge metadata dict of a node, created on first use."""
    return node.meta.setdefault(KEY, {})


def record_rewrite(new: fx.Node, pass_name: str, *replaced: fx.Node) -> None:
    """Provenance: ``new`` was written by ``pass_name`` in place of ``replaced`` (for reports and diffs).

    ``new`` computes the value of the last replaced node, so it inherits that node's shape metadata, and
    the module path it was traced in when it has none of its own (per-layer quantization settings use it).
    """
    origins: list[str] = []
    for old in replaced:
        origins.extend(fxmeta(old).get("origins", [old.name]))
    meta = fxmeta(new)
    meta["origins"] = list(dict.fromkeys(origins))
    meta["rewritten_by"] = pass_name
    for key in ("type", "tensor_meta"):  # as set by torch.fx's ShapeProp
        if replaced and key in replaced[-1].meta:
            new.meta[key] = replaced[-1].meta[key]
    if replaced and "nn_module_stack" in replaced[-1].meta:
        new.meta.setdefault("nn_module_stack", replaced[-1].meta["nn_module_stack"])


def tensor_shape(node: fx.Node) -> torch.Size | None:
    """Shape recorded by shape propagation, or None when unknown / not a tensor."""
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "shape", None)


def tensor_info(node: fx.Node) -> Any:
    """What is known of the tensor ``node`` computes (``.shape``, ``.dtype``), or None: fxforge's shape
    propagation (``meta["tensor_meta"]``) first, else the example value other capture paths record
    (``meta["val"]`` from make_fx / torch.export, ``meta["example_value"]`` from dynamo)."""
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype"):
        return tm
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None

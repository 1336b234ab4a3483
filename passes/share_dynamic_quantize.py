"""Sibling dynamic int8 linears merged: linears that read one tensor, each through its own per-call quantize,
become one linear on one quantize, its output split (attention's Q, K and V projections read one tensor).

Rewrites (quantize-dynamic's reference form; the lowering maps the result to one ``quantized.linear_dynamic``):
    linear_a(dynamic_quantize(x)), linear_b(dynamic_quantize(x)), ...
        -> split(linear_ab(dynamic_quantize(x)), [out_a, out_b, ...], -1)
Why correct: ``dynamic_quantize`` takes its scale from x alone, so every sibling's input is rounded to the same
values; the merged weight stacks the siblings' int8 rows, each row keeping its own scale and zero point (a
per-tensor layer's scale repeated over its rows), so each output element is the same dot product of the same
integers times the same scales. x is quantized once instead of once per sibling, in one GEMM instead of several.
Preconditions: quantize-dynamic ran; siblings are plain ``nn.Linear`` modules with int8 weight qparams
(``weight_scale`` / ``weight_zero_point`` buffers), each called once, read through a quantize with no other user.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx, nn

from fxforge.graph.matching import call_count, module_of
from fxforge.graph.meta import fxmeta, record_rewrite
from fxforge.quant.reference import dynamic_quantize

log = logging.getLogger(__name__)


def _quantized_linear(gm: fx.GraphModule, quantize: fx.Node) -> fx.Node | None:
    """The linear call that is ``quantize``'s only user (and reads nothing else), else None."""
    if len(quantize.users) != 1:
        return None
    (user,) = quantize.users
    linear = module_of(gm, user)
    if type(linear) is not nn.Linear or not hasattr(linear, "weight_scale") or user.args != (quantize,) \
            or user.kwargs or call_count(gm, str(user.target)) != 1:
        return None
    return user


def sibling_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups (in graph order) of two or more quantized linear calls whose quantizes read one tensor alike."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not dynamic_quantize:
            continue
        linear = _quantized_linear(gm, node)
        if linear is not None:
            key = (node.args[0], node.args[1:], tuple(sorted(node.kwargs.items())))
            groups.setdefault(key, []).append(linear)
    return [group for group in groups.values() if len(group) > 1]


def _per_row(value: torch.Tensor, rows: int) -> torch.Tensor:
    return value.reshape(-1).expand(rows) if value.numel() == 1 else value.reshape(rows)


def merged_linear(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing ``linears`` side by side: their weights (on the int8 grid) stacked, each row's
    qparams kept; zeros for a missing bias."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = any(m.bias is not None for m in linears)
    merged = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if has_bias:
            merged.bias.copy_(torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                                         for m in linears]))
    merged.register_buffer("weight_scale", torch.cat([_per_row(m.weight_scale, m.out_features).float()
                                                      for m in linears]))
    merged.register_buffer("weight_zero_point", torch.cat([_per_row(m.weight_zero_point, m.out_features).long()
                                                           for m in linears]))
    return merged.train(linears[0].training)


def _merged_path(gm: fx.GraphModule, paths: list[str]) -> str:
    """``<first's parent>.<leaf>_<leaf>...``: query_key_value beside query, key and value (made unique)."""
    parent, _, _ = paths[0].rpartition(".")
    name = "_".join(p.rpartition(".")[2] for p in paths)
    path = f"{parent}.{name}" if parent else name
    while _exists(gm, path):
        path += "_"
    return path


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def _merge(gm: fx.GraphModule, group: list[fx.Node]) -> None:
    paths = [str(node.target) for node in group]
    linears = [gm.get_submodule(p) for p in paths]
    path = _merged_path(gm, paths)
    gm.add_submodule(path, merged_linear(linears))
    quantize = group[0].args[0]  # the first of their quantizes: before every sibling
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(min(group, key=order.__getitem__)):
        merged = gm.graph.call_module(path, (quantize,))
        parts = gm.graph.call_function(torch.split, (merged, [m.out_features for m in linears], -1))
        outputs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
    fxmeta(merged)["rewritten_by"] = "quantize-dynamic"  # its value is no one linear's: the parts carry those
    for node, output in zip(group, outputs, strict=True):
        record_rewrite(output, "quantize-dynamic", node)  # part i is sibling i's output (reports, debug.compare)
        node.replace_all_uses_with(output)
        own_quantize = node.args[0]
        gm.graph.erase_node(node)
        if own_quantize is not quantize:
            gm.graph.erase_node(own_quantize)
    for old in paths:
        gm.delete_submodule(old)


def share_dynamic_quantize(gm: fx.GraphModule) -> int:
    """Merge every group of sibling dynamic int8 linears (see the module docstring); the number of linears
    merged away (a Q/K/V group counts 2)."""
    groups = sibling_groups(gm)
    for group in groups:
        _merge(gm, group)
    if groups:
        gm.graph.lint()
        gm.recompile()
        log.debug("quantize-dynamic: %d groups of sibling linears share one quantize", len(groups))
    return sum(len(g) - 1 for g in groups)

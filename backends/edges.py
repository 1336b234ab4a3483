"""Reduced-precision casts at the graph's edges, for lowerings that compute in bf16 / fp16 (lower-cpu-bf16,
lower-cuda): the caller passes and gets back what eager takes and returns, inside every value is in ``dtype``.

    each floating graph input x   =>  x.to(dtype)                                 once, at the top of the graph
                                      x.to(dtype, memory_format=channels_last)    (4-d, when only to-nhwc's
                                                                                   conversions into channels-last
                                                                                   read x: they become no-ops)
    each floating graph output y  =>  y.to(<eager dtype>, memory_format=<eager's>)  (contiguous where eager's was)
    to-nhwc's NCHW copy v.contiguous() before an output  =>  folded into that cast: v.to(<eager dtype>, contiguous)
An input returned as it is stays untouched (no round trip through ``dtype``). Eager's dtypes and layouts come
from the shape metadata recorded on the eager graph. Both lowerings run after to-nhwc (property ``nhwc``): its
conversions are marked in ``fxmeta(node)["nhwc"]`` ("enter", "exit") and region outputs left channels-last by
``to-nhwc{outputs=channels_last}`` in ``fxmeta(node)["layout"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxforge.graph.meta import fxmeta, record_rewrite

_CL = torch.channels_last


def floating_meta(node: object) -> Any:
    """The eager tensor metadata of a floating-point value, else None (non-tensors, tuples, integer tensors)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point else None


def _into_channels_last(node: fx.Node, meta: Any) -> bool:
    """A 4-d input whose readers are all to-nhwc conversions into channels-last: cast it there directly."""
    return len(meta.shape) == 4 and all(fxmeta(u).get("nhwc") == "enter" for u in node.users if u.op != "output")


def cast_inputs(gm: fx.GraphModule, dtype: torch.dtype, pass_name: str) -> int:
    """Each floating graph input -> ``dtype`` once, at the top of the graph; returns how many were cast."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    count = 0
    for node in placeholders:
        meta = floating_meta(node)
        if meta is None:
            continue
        kwargs = {"dtype": dtype, **({"memory_format": _CL} if _into_channels_last(node, meta) else {})}
        with gm.graph.inserting_after(placeholders[-1]):
            cast = gm.graph.call_method("to", (node,), kwargs)
        record_rewrite(cast, pass_name, node)
        node.replace_all_uses_with(cast, delete_user_cb=lambda user, c=cast: user is not c and user.op != "output")
        count += 1
    return count


def restore_outputs(gm: fx.GraphModule, pass_name: str) -> None:
    """Floating graph outputs -> the dtype eager returned, NCHW-contiguous where eager's were (to-nhwc's copy to
    NCHW before an output folded into the cast: one copy instead of two)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")

    def restore(value: object) -> object:
        meta = floating_meta(value)
        if meta is None or value.op == "placeholder":
            return value
        source = value
        fmt = torch.contiguous_format if meta.memory_format == torch.contiguous_format else torch.preserve_format
        if fxmeta(value).get("layout") == "channels_last":
            fmt = torch.preserve_format  # to-nhwc{outputs=channels_last} left it so
        elif fxmeta(value).get("nhwc") == "exit" and len(value.users) == 1:
            source = value.args[0]  # cast and make NCHW in one copy
        with gm.graph.inserting_before(output):
            new = gm.graph.call_method("to", (source,), {"dtype": meta.dtype, "memory_format": fmt})
        record_rewrite(new, pass_name, value)
        return new

    output.args = fx.node.map_aggregate(output.args, restore)
    for node in [n for n in gm.graph.nodes if fxmeta(n).get("nhwc") == "exit" and not n.users]:
        gm.graph.erase_node(node)

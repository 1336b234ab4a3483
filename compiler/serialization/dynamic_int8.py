"""The dynamic int8 linears of a lowered graph on plain int8 tensors, for the deploy formats.

A lowered dynamic int8 graph calls ``quantized.linear_dynamic(x, packed, reduce_range)`` on a prepacked weight
(``get_attr`` of a torch.ao script object), which neither ``torch.export`` nor ONNX can hold. ``unpack_linears``
returns a copy of the graph where each such call reads the weight's int8 values, scales, zero points and bias as
buffers instead:
    quantized.linear_dynamic(x, _packed_0.packed, rr) -> call(x, w_int8, w_scale, w_zero_point, bias, rr)
``call`` is the form the format runs: ``quant.dynamic_kernels.dynamic_linear`` (plain aten ops, bit-identical
to the fbgemm / x86 kernel) for ``.pt2`` programs, ``onnx_dynamic.dynamic_linear_op`` for ONNX.
Why correct: ``quantized.linear_unpack`` returns the int8 weight and bias the kernel was packed with.
The compiled model is not changed: the copy shares its modules and gets buffers of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from fxforge.quant.dynamic_kernels import int8_parts

from .codec import copy_graph_module

__all__ = ["LINEAR_DYNAMIC", "unpack_linears", "unpacked_weight"]

LINEAR_DYNAMIC = (torch.ops.quantized.linear_dynamic, torch.ops.quantized.linear_dynamic.default)


def unpacked_weight(packed: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(int8 weight (out, in), float32 scale per row, int32 zero point per row, float32 bias (zeros if none)) of
    a packed linear weight."""
    weight, bias = torch.ops.quantized.linear_unpack(packed)
    bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach()
    return (*int8_parts(weight), bias.float())


def _packed_of(gm: fx.GraphModule, node: fx.Node) -> Any:
    return functools.reduce(getattr, str(node.target).split("."), gm)


def _is_packed_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_DYNAMIC and isinstance(node.args[1], fx.Node) \
        and node.args[1].op == "get_attr"


def unpack_linears(gm: fx.GraphModule, call: Callable[..., Tensor]) -> tuple[fx.GraphModule, int]:
    """(a copy of ``gm`` with every dynamic int8 linear reading plain tensors through ``call``, how many);
    ``gm`` itself where it has none."""
    if not any(_is_packed_linear(n) for n in gm.graph.nodes):
        return gm, 0
    new = copy_graph_module(gm)
    found = [n for n in new.graph.nodes if _is_packed_linear(n)]
    for k, node in enumerate(found):
        x, packed, reduce_range = node.args
        names = []
        for what, tensor in zip(("weight", "scale", "zero_point", "bias"), unpacked_weight(_packed_of(new, packed)),
                                strict=True):
            names.append(f"_dynamic_linear_{k}_{what}")
            new.register_buffer(names[-1], tensor)
        with new.graph.inserting_before(node):
            attrs = [new.graph.get_attr(name) for name in names]
            replacement = new.graph.call_function(call, (x, *attrs, reduce_range))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        new.graph.erase_node(node)
        if not packed.users:
            new.graph.erase_node(packed)
    new.graph.lint()
    new.recompile()
    new.delete_all_unused_submodules()  # the packed weights' owners (of the copy only): export lifts what it finds
    return new, len(found)

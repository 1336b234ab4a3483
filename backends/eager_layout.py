"""Eager's layout where it is observable, for lowerings whose kernels return channels-last tensors on their own.

The int8 kernels (quantized conv, batch norm, cat of one-channel maps) return channels-last tensors whatever their
input's layout, and the int8 pipelines run no ``to-nhwc`` (nothing to save between int8 kernels), so their lowering
gives eager's NCHW layout back where a user or an op can tell:
    x.view(...)                                  =>  x.contiguous().view(...)   (view fails on channels-last strides)
    y = x.flatten(1); y.relu_()  (x eager-NCHW)   =>  x = x.contiguous() first   (eager's flatten is a view: the
                                                     mutation must reach x, which a copy would not carry back)
    output x (eager returned it NCHW-contiguous) =>  output x.contiguous()
``.contiguous()`` is a no-op on a value already contiguous (one that never passed through such a kernel).
The float lowerings (lower-cpu, lower-cpu-bf16, lower-cuda) need none of this: they run after ``to-nhwc``, which
made every layout change explicit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from fxforge.graph.matching import is_in_place
from fxforge.graph.meta import record_rewrite
from fxforge.graph.ops import op_name


def _eager_was_contiguous_4d(value: object) -> bool:
    """A rank-4 tensor value that eager produced in the default (NCHW-contiguous) layout.

    The shape metadata was recorded on the eager graph, before lowering made conv outputs channels-last.
    """
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    shape = getattr(meta, "shape", None)  # None too for nodes returning tuples
    return shape is not None and len(shape) == 4 and meta.memory_format == torch.contiguous_format


def _contiguous_before(gm: fx.GraphModule, value: fx.Node, before: fx.Node, pass_name: str) -> fx.Node:
    with gm.graph.inserting_before(before):
        new = gm.graph.call_method("contiguous", (value,))
    record_rewrite(new, pass_name, value)
    return new


_RESHAPES = {"flatten", "reshape", "view"}  # op names (graph/ops.py knows their spellings)


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    """flatten / reshape / view: a view of their input on NCHW-contiguous tensors, a copy on channels-last."""
    return op_name(node) in _RESHAPES


def _mutated_through_reshape(gm: fx.GraphModule, value: fx.Node) -> bool:
    """True when an in-place op mutates ``value`` through a reshape of it (``value.flatten(1).relu_()``):
    eager's mutation reaches ``value`` only while the reshape is a view, i.e. in the NCHW layout."""
    views = [u for u in value.users if _is_reshape(gm, u)]
    while views:
        view = views.pop()
        if any(is_in_place(gm, u) and u.args and u.args[0] is view for u in view.users):
            return True
        views.extend(u for u in view.users if _is_reshape(gm, u))
    return False


def _contiguous_after(gm: fx.GraphModule, value: fx.Node, pass_name: str) -> None:
    """Every reader of ``value`` reads it NCHW-contiguous (one copy, shared: aliasing as in eager)."""
    with gm.graph.inserting_after(value):
        new = gm.graph.call_method("contiguous", (value,))
    value.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    record_rewrite(new, pass_name, value)


def _contiguous_in_eager(output: fx.Node, reference: Any) -> set[fx.Node]:
    """The output values that eager returned as NCHW-contiguous rank-4 tensors (``reference``: its outputs)."""
    nodes, refs = tree_flatten(output.args[0])[0], tree_flatten(reference)[0]
    if len(nodes) != len(refs):
        return set()
    return {n for n, r in zip(nodes, refs, strict=True) if isinstance(n, fx.Node) and isinstance(r, torch.Tensor)
            and r.dim() == 4 and r.is_contiguous()}


def restore_eager_layout(gm: fx.GraphModule, pass_name: str, reference: Any = None) -> int:
    """Where eager had NCHW-contiguous tensors, give them back before layout-sensitive uses: ``.view``
    (which fails on channels-last strides), reshapes whose result is mutated in place (the mutation must
    reach the reshaped value, as it does through eager's view) and graph outputs. ``.contiguous()`` is a
    no-op when the value is already contiguous, e.g. when it never passed through a lowered conv.
    Eager's layout comes from the shape metadata, and for the outputs from ``reference`` (eager's outputs)
    when given: graphs whose metadata was propagated after quantization no longer know it.
    Returns the number of ``contiguous`` calls added."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" and _eager_was_contiguous_4d(node) and _mutated_through_reshape(gm, node):
            _contiguous_after(gm, node, pass_name)
            count += 1
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "view" and _eager_was_contiguous_4d(node.args[0]):
            node.replace_input_with(node.args[0], _contiguous_before(gm, node.args[0], node, pass_name))
            count += 1
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    contiguous = _contiguous_in_eager(output, reference) if reference is not None else None

    def restore(value: object) -> object:
        nonlocal count
        if not (_eager_was_contiguous_4d(value) if contiguous is None else value in contiguous):
            return value
        count += 1
        return _contiguous_before(gm, value, output, pass_name)

    output.args = fx.node.map_aggregate(output.args, restore)
    return count

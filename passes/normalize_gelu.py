"""normalize-gelu: one spelling of the tanh GELU, ``aten.gelu(x, approximate="tanh")``.

Rewrites: ``(0.5 * x) * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))`` (transformers' ``gelu_new`` /
``NewGELUActivation``, GPT-2's activation; any operand order) -> one ``aten.gelu(x, approximate="tanh")``.
Why correct: it is the same function (the constants are matched to float32 precision); the nodes only the
spelled-out form read are erased. One node instead of eight saves their time on every target, and lets a
lowering take the GELU as a Linear's post-op.
Preconditions: none.
"""

from __future__ import annotations

import math
from numbers import Number

import torch
from torch import fx

from fxforge.graph.meta import record_rewrite
from fxforge.graph.ops import op_name
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _scalar_operand(node: object, op: str, value: float) -> fx.Node | None:
    """t for ``t <op> value`` or ``value <op> t`` (op "mul" or "add", ``value`` to float32 precision), else None."""
    if not isinstance(node, fx.Node) or op_name(node) != op or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, Number):
        a, b = b, a
    close = isinstance(b, Number) and not isinstance(b, bool) and abs(b - value) <= 1e-6 * abs(value)
    return a if close and isinstance(a, fx.Node) else None


def _cubic_inner(node: object) -> fx.Node | None:
    """x for ``x + 0.044715 * x ** 3`` (either operand order), else None."""
    if not isinstance(node, fx.Node) or op_name(node) != "add" or len(node.args) != 2 or node.kwargs:
        return None
    for x, term in (node.args, node.args[::-1]):
        cube = _scalar_operand(term, "mul", 0.044715)
        if isinstance(cube, fx.Node) and op_name(cube) == "pow" and cube.args[0] is x \
                and cube.args[1:] in ((3,), (3.0,)):
            return x
    return None


def _tanh_gelu_input(node: fx.Node) -> fx.Node | None:
    """x when ``node`` is ``(0.5 * x) * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))`` (transformers'
    ``NewGELUActivation`` / ``gelu_new``, any operand order), else None."""
    if op_name(node) != "mul" or len(node.args) != 2 or node.kwargs:
        return None
    for half, one_plus in (node.args, node.args[::-1]):
        x = _scalar_operand(half, "mul", 0.5)
        tanh = _scalar_operand(one_plus, "add", 1.0)
        if x is None or not isinstance(tanh, fx.Node) or op_name(tanh) != "tanh":
            continue
        inner = _scalar_operand(tanh.args[0], "mul", _SQRT_2_OVER_PI)
        if inner is not None and _cubic_inner(inner) is x:
            return x
    return None


def _erase_unread(node: fx.Node, keep: fx.Node) -> None:
    """Erase ``node`` and, recursively, the pure computations only it read (stopping at ``keep``)."""
    if node is keep or node.users or node.op != "call_function" or node.is_impure():
        return
    inputs = [a for a in node.all_input_nodes]
    node.graph.erase_node(node)
    for a in inputs:
        _erase_unread(a, keep)


def _spelled_out_gelu_to_gelu(gm: fx.GraphModule, pass_name: str) -> int:
    """Replace each spelled-out tanh GELU by one ``aten.gelu(x, approximate="tanh")`` (the same function; the
    nodes only it read are erased); the count. Then a Linear before it can take the GELU as its post-op."""
    count = 0
    for node in list(gm.graph.nodes):
        x = _tanh_gelu_input(node)  # the nodes erased below come before ``node``: already visited
        if x is None:
            continue
        with gm.graph.inserting_before(node):
            gelu = gm.graph.call_function(torch.ops.aten.gelu.default, (x,), {"approximate": "tanh"})
        record_rewrite(gelu, pass_name, node)
        node.replace_all_uses_with(gelu)
        _erase_unread(node, x)
        count += 1
    if count:
        gm.recompile()
    return count


@graph_pass(name="normalize-gelu")
def normalize_gelu(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Spelled-out tanh GELU -> aten.gelu(approximate="tanh")."""
    count = _spelled_out_gelu_to_gelu(gm, "normalize-gelu")
    if count:
        ctx.note(f"{count} spelled-out tanh GELU(s) -> aten.gelu(approximate='tanh')")
    return PassResult(gm, modified=bool(count))

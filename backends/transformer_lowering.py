"""Transformer layers onto oneDNN linears: the part of lower-cpu / lower-cpu-bf16 that handles Linear epilogues.

Rewrites (called by the lowerings before their per-module pass):
    Conv1D(x)                    =>  Linear(x)                  (transformers' GPT-2 projection; weight [in, out]
                                                                 transposed once, here)
    0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))  =>  gelu(x, approximate="tanh")   (GPT-2's spelled-out GELU)
    gelu(linear(x))              =>  OneDnnLinear[gelu](x)       (erf or tanh GELU: oneDNN's eltwise post-op)
    linear(x) + other            =>  OneDnnLinear[add](x, other) (a residual: oneDNN's binary post-op)
Why correct: the spelled-out form is the tanh GELU's definition (torch computes the same formula in one kernel);
Conv1D computes ``addmm(bias, x, W)`` = ``F.linear(x, W.T, bias)``; the oneDNN op computes the same
product with the same weights and applies the GELU / add inside the kernel, so results differ from eager only by
float summation order (checked in tests/backends/test_transformer_lowering.py). Absorbed values have one user
(the linear's output is read by the GELU / add alone); ``other`` has the output's shape and dtype (no
broadcasting); the fused call runs where the GELU / add ran, after both operands exist.
Preconditions: shapes propagated; fp32 or bf16 weights as the caller's ``make`` expects. A module called from
several nodes (shared weights) is left alone.

Before: ``y = gelu(dense(x))``   After: ``y = dense(x)``  (dense: OneDnnLinear, post-op gelu)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import fx, nn

from fxforge.graph.matching import call_count, module_of, replace_submodule, sole_user
from fxforge.graph.meta import record_rewrite, tensor_info
from fxforge.graph.ops import op_name
from fxforge.passes.weight_only import as_linear

log = logging.getLogger(__name__)

# (linear, activation, rows, add) -> the fused module (OneDnnLinear or a subclass)
LinearMaker = Callable[[nn.Linear, str, "int | None", bool], nn.Module]


def conv1d_to_linear(gm: fx.GraphModule) -> int:
    """Replace each transformers ``Conv1D`` submodule called in the graph by its Linear twin; the count."""
    count = 0
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if module is None or isinstance(module, nn.Linear):
            continue
        linear = as_linear(module)
        if linear is not None:
            replace_submodule(gm, str(node.target), linear)
            count += 1
    return count


def rows_of(node: fx.Node) -> int | None:
    """How many rows a linear multiplies: the product of its input's dimensions but the last, else None."""
    info = tensor_info(node)
    shape = getattr(info, "shape", None)
    return None if shape is None or len(shape) < 2 else int(torch.Size(shape[:-1]).numel())


def _gelu_form(node: fx.Node) -> str | None:
    """"gelu" / "gelu_tanh" for a GELU call (function, method or nn.GELU) on one tensor, else None."""
    if op_name(node) != "gelu":
        return None
    if node.op == "call_module":
        approximate = getattr(module_of(node.graph.owning_module, node), "approximate", None)
    else:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate) if isinstance(approximate, str) else None


def _residual(add: fx.Node, linear: fx.Node) -> fx.Node | None:
    """The other operand of ``linear + other`` when it has the linear output's shape and dtype, else None."""
    if op_name(add) != "add" or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1 \
            or set(add.kwargs) - {"alpha"}:
        return None
    other = add.args[1] if add.args[0] is linear else add.args[0]
    if not isinstance(other, fx.Node) or other is linear:
        return None
    mine, theirs = tensor_info(linear), tensor_info(other)
    same = mine is not None and theirs is not None and getattr(mine, "shape", None) == getattr(theirs, "shape", 0)
    return other if same and getattr(mine, "dtype", None) == getattr(theirs, "dtype", 0) else None


def _fuse(gm: fx.GraphModule, node: fx.Node, epilogue: fx.Node, module: nn.Module, args: tuple,
          pass_name: str) -> None:
    """Call ``module`` (at the linear's path) where ``epilogue`` ran, in place of both nodes."""
    replace_submodule(gm, str(node.target), module)
    with gm.graph.inserting_before(epilogue):
        fused = gm.graph.call_module(str(node.target), args)
    record_rewrite(fused, pass_name, node, epilogue)
    epilogue.replace_all_uses_with(fused)
    gm.graph.erase_node(epilogue)
    gm.graph.erase_node(node)


def fuse_linear_epilogues(gm: fx.GraphModule, pass_name: str, make: LinearMaker,
                          dtype: torch.dtype = torch.float32) -> Counter:
    """Each plain Linear (of ``dtype``) followed by a GELU or a residual add -> ``make``'s fused module;
    counts per post-op."""
    counts: Counter = Counter()
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        linear = module_of(gm, node)
        user = sole_user(node)
        if type(linear) is not nn.Linear or linear.weight.dtype != dtype or user is None or len(node.args) != 1 \
                or node.kwargs or call_count(gm, str(node.target)) != 1:
            continue
        rows = rows_of(node.args[0])
        gelu = _gelu_form(user)
        if gelu is not None and user.args and user.args[0] is node:
            _fuse(gm, node, user, make(linear, gelu, rows, False), (node.args[0],), pass_name)
            counts[gelu] += 1
            continue
        other = _residual(user, node)
        if other is not None:
            _fuse(gm, node, user, make(linear, "", rows, True), (node.args[0], other), pass_name)
            counts["add"] += 1
    gm.graph.lint()
    gm.recompile()
    log.debug("%s: linear epilogues fused: %s", pass_name, dict(counts))
    return counts

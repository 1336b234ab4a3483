"""The op table (fxforge.graph.ops): every spelling of an op has its name, and the passes that look it up agree."""

from __future__ import annotations

import inspect
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import fxforge
from fxforge.graph.matching import activation_of, is_fresh, is_relu
from fxforge.graph.ops import (
    ACTIVATIONS,
    CANONICAL,
    TABLE,
    canonical_op,
    hardtanh_bounds,
    module_op,
    op_name,
    out_of_place,
    spellings,
)
from fxforge.passes.to_nhwc import conversions
from fxforge.quant.ops import op_info


class _Root(nn.Module):
    pass


def call(target, *args, **kwargs) -> fx.Node:
    """A graph calling ``target`` once on placeholder ``x`` (written ``"x"`` in ``args``): a function, a Tensor
    method (a string) or a module; returns that call's node."""
    root, graph = _Root(), fx.Graph()
    x = graph.placeholder("x")
    args = tuple(x if a == "x" else a for a in args)
    if isinstance(target, nn.Module):
        root.add_module("m", target)
        node = graph.call_module("m", args, kwargs)
    elif isinstance(target, str):
        node = graph.call_method(target, args, kwargs)
    else:
        node = graph.call_function(target, args, kwargs)
    graph.output(node)
    return next(n for n in fx.GraphModule(root, graph).graph.nodes if n.op == node.op)


def aten(fn, *shape: int) -> fx.Node:
    """The last call of ``fn``'s make_fx graph: the aten overload it runs."""
    gm = make_fx(fn)(torch.randn(*(shape or (2, 3))))
    return [n for n in gm.graph.nodes if n.op == "call_function"][-1]


# op -> graphs spelling it: written out here, independently of the table
SPELLINGS = {
    "relu": lambda: [call(torch.relu, "x"), call(F.relu, "x"), call(F.relu, "x", inplace=False), call("relu", "x"),
                     call(nn.ReLU(), "x"), aten(torch.relu)],
    "relu_": lambda: [call(torch.relu_, "x"), call("relu_", "x"), call(F.relu, "x", inplace=True),
                      call(F.relu, "x", True), call(nn.ReLU(inplace=True), "x"), aten(lambda x: x.clone().relu_())],
    "hardswish": lambda: [call(F.hardswish, "x"), call(nn.Hardswish(), "x"), aten(lambda x: F.hardswish(x))],
    "hardswish_": lambda: [call(F.hardswish, "x", inplace=True), call(nn.Hardswish(inplace=True), "x"),
                           aten(lambda x: F.hardswish(x.clone(), inplace=True))],
    "hardtanh": lambda: [call(F.hardtanh, "x", 0.0, 6.0), call(nn.Hardtanh(-2.0, 2.0), "x"),
                         aten(lambda x: F.hardtanh(x, 0.0, 6.0))],
    "hardtanh_": lambda: [call(F.hardtanh, "x", 0.0, 6.0, True), call(F.hardtanh_, "x"),
                          call(nn.Hardtanh(inplace=True), "x")],
    "add": lambda: [call(operator.add, "x", "x"), call(torch.add, "x", "x"), call("add", "x", "x"),
                    aten(lambda x: x + x)],
    "add_": lambda: [call(operator.iadd, "x", "x"), call("add_", "x", "x"), aten(lambda x: x.clone().add_(x))],
    "max_pool2d": lambda: [call(F.max_pool2d, "x", 2), call(torch.max_pool2d, "x", 2), call(nn.MaxPool2d(2), "x")],
    "cat": lambda: [call(torch.cat, ["x", "x"]), call(torch.concat, ["x", "x"]),
                    aten(lambda x: torch.cat([x, x]))],
    "mean": lambda: [call(torch.mean, "x"), call("mean", "x", (2, 3)), aten(lambda x: x.mean((0, 1)))],
    "dropout": lambda: [call(F.dropout, "x", 0.5, False), call(torch.dropout, "x", 0.5, False),
                        call(nn.Dropout(), "x")],
}


@pytest.mark.parametrize("op", list(SPELLINGS))
def test_every_spelling_has_the_op_name(op: str):
    nodes = SPELLINGS[op]()
    assert [op_name(n) for n in nodes] == [op] * len(nodes)


def test_in_place_ops_are_forms_of_their_out_of_place_op():
    in_place = [op for op in TABLE if op.endswith("_")]
    assert {"relu_", "add_", "hardswish_", "relu6_", "dropout_"} <= set(in_place)
    assert all(out_of_place(op) == op[:-1] and op[:-1] in TABLE for op in in_place)
    assert [out_of_place(op) for op in ("relu", "add", "getitem")] == ["relu", "add", "getitem"]


def test_an_inplace_flag_that_is_not_a_constant_names_no_op():
    graph = fx.Graph()
    x, flag = graph.placeholder("x"), graph.placeholder("flag")
    node = graph.call_function(F.relu, (x,), {"inplace": flag})
    assert op_name(node) is None


class _MyReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


@pytest.mark.parametrize("node", [
    lambda: call(torch.erf, "x"), lambda: call("erf", "x"), lambda: call(nn.PReLU(), "x"),
    lambda: call(_MyReLU(), "x"),  # a subclass may compute something else: module types match exactly
    lambda: aten(torch.erf),
], ids=["function", "method", "module", "subclass", "aten"])
def test_an_unknown_op_has_no_name(node):
    assert op_name(node()) is None


def test_only_calls_have_an_op():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    kinds = {n.op: op_name(n) for n in gm.graph.nodes}
    assert kinds == {"placeholder": None, "call_module": "linear", "output": None}


def test_each_spelling_belongs_to_one_op():
    for kind in ("functions", "methods", "modules", "aten"):
        listed = [s for spelled in TABLE.values() for s in getattr(spelled, kind)]
        assert len(listed) == len(set(listed)), kind


def test_every_inplace_flag_has_an_in_place_op():
    """F.relu(x, inplace=True) and nn.ReLU(inplace=True) name ``relu_``: that op must be in the table."""
    for op, spelled in TABLE.items():
        flagged = [f for f in spelled.functions if "inplace" in _parameters(f)]
        flagged += [m for m in spelled.modules if "inplace" in inspect.signature(m).parameters]
        assert not flagged or op + "_" in TABLE, op


def _parameters(function) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def test_spellings_lists_each_kind_of_spelling():
    relu = spellings("relu")
    assert torch.relu in relu.functions and "relu" in relu.methods and nn.ReLU in relu.modules
    assert torch.ops.aten.relu.default in relu.aten
    assert module_op(nn.ReLU()) == "relu" and module_op(nn.ReLU(inplace=True)) == "relu_"
    assert module_op(nn.ReLU6()) == "relu6" and module_op(nn.PReLU()) is None


def test_canonical_ops_take_tensors_only():
    relu = call(F.relu, "x", inplace=False)
    assert canonical_op(relu) == ("relu", (relu.args[0],))
    assert canonical_op(call(F.relu6, "x", True))[0] == "relu6_"
    assert canonical_op(call(torch.add, "x", "x", alpha=2)) is None
    assert canonical_op(call(nn.Conv2d(1, 1, 1), "x")) is None  # a module with weights: patterns match its type
    assert canonical_op(call(F.hardtanh, "x", 0.0, 6.0)) is None  # bounds are arguments
    assert "conv2d" not in CANONICAL and {"relu", "relu_", "add", "mul_"} <= CANONICAL


@pytest.mark.parametrize(("node", "bounds"), [
    (lambda: call(F.relu6, "x"), (0.0, 6.0)),
    (lambda: call(nn.ReLU6(inplace=True), "x"), (0.0, 6.0)),
    (lambda: call(nn.Hardtanh(-2.0, 2.0), "x"), (-2.0, 2.0)),
    (lambda: call(F.hardtanh, "x", 0.0, 6.0), (0.0, 6.0)),
    (lambda: call(F.hardtanh, "x", min_val=0.0, max_val=6.0), (0.0, 6.0)),
    (lambda: call(F.hardtanh, "x", max_val=6.0), (-1.0, 6.0)),
    (lambda: call(F.hardtanh, "x", 0.0, 6.0, True), (0.0, 6.0)),
    (lambda: aten(lambda x: F.hardtanh(x, 0.0, 6.0)), (0.0, 6.0)),
    (lambda: call(F.hardtanh, "x", "x", 6.0), None),  # a bound computed at run time
    (lambda: call(torch.relu, "x"), None),
], ids=["relu6", "ReLU6", "Hardtanh", "positional", "keywords", "default-min", "in-place", "aten", "tensor",
        "relu"])
def test_hardtanh_bounds(node, bounds):
    assert hardtanh_bounds(node()) == bounds


# ---------------------------------------------------------------------------------------------- consumers
def _gm(node: fx.Node) -> fx.GraphModule:
    return node.graph.owning_module


ACTIVATION_SPELLINGS = {
    "relu": lambda: [*SPELLINGS["relu"](), *SPELLINGS["relu_"]()],
    "relu6": lambda: [call(F.relu6, "x"), call(F.relu6, "x", True), call(nn.ReLU6(), "x"),
                      call(nn.ReLU6(inplace=True), "x")],
    "hardswish": lambda: [*SPELLINGS["hardswish"](), *SPELLINGS["hardswish_"]()],
    "silu": lambda: [call(F.silu, "x"), call(F.silu, "x", inplace=True), call(nn.SiLU(), "x"),
                     aten(lambda x: F.silu(x))],
}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_fusion_and_quantization_see_the_same_activation_in_every_spelling(act: str):
    nodes = ACTIVATION_SPELLINGS[act]()
    assert [activation_of(_gm(n), n) for n in nodes] == [act] * len(nodes)
    assert [op_info(_gm(n), n).kind for n in nodes] == [act] * len(nodes)
    assert all(is_relu(_gm(n), n) == (act == "relu") for n in nodes)


def test_hardtanh_from_0_to_6_fuses_as_relu6_and_quantizes_as_hardtanh():
    nodes = [call(F.hardtanh, "x", 0.0, 6.0), call(F.hardtanh, "x", min_val=0.0, max_val=6.0),
             call(nn.Hardtanh(0.0, 6.0, inplace=True), "x")]
    assert [activation_of(_gm(n), n) for n in nodes] == ["relu6"] * 3
    assert [op_info(_gm(n), n).kind for n in nodes] == ["hardtanh"] * 3
    other = call(F.hardtanh, "x", max_val=6.0)
    assert activation_of(_gm(other), other) is None


def test_in_place_spellings_quantize_as_their_op_and_are_not_fresh():
    pairs = [(call("add", "x", "x"), call("add_", "x", "x")), (call(torch.relu, "x"), call(F.relu, "x", True)),
             (call(nn.Hardswish(), "x"), call(nn.Hardswish(inplace=True), "x"))]
    for out, mutating in pairs:
        assert op_info(_gm(out), out) == op_info(_gm(mutating), mutating)
        assert is_fresh(_gm(out), out) and not is_fresh(_gm(mutating), mutating)


class _ConvPoolConv(nn.Module):
    """conv -> torch.max_pool2d (a spelling of max pooling the layout pass did not list) -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.max_pool2d(self.a(x), 2))


def test_to_nhwc_keeps_every_spelling_of_an_op_in_its_region():
    """One region from the first conv to the last: converted once in, once out (to eager's layout)."""
    model, x = _ConvPoolConv().eval(), torch.randn(2, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, pipeline="to-nhwc")
    assert conversions(compiled.graph_module) == {"enter": 1, "exit": 1}
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x))

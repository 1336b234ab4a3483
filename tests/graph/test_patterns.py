"""fxforge.patterns: what matches (spellings, modules, wildcards, constraints), what does not, and rewriting."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp

import fxforge
from fxforge import patterns as P

SILU = P.Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x))


def traced(fn_or_module, *inputs):
    """A traced graph of a function or module, with shapes propagated when inputs are given."""
    module = fn_or_module if isinstance(fn_or_module, nn.Module) else _Wrap(fn_or_module)
    gm = fx.symbolic_trace(module)
    if inputs:
        ShapeProp(gm).propagate(*inputs)
    return gm


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def matched(gm, rules):
    return [[n.name for n in m.nodes] for m in P.find(gm, rules)]


class ReluSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x) + F.relu(x) + x.relu() + torch.relu(x)


def test_one_pattern_matches_every_spelling_including_call_module():
    gm = traced(ReluSpellings())
    found = P.find(gm, P.Rule(lambda x: torch.relu(x), lambda x: torch.relu(x)))
    assert sorted(m.anchor.op for m in found) == ["call_function", "call_function", "call_method", "call_module"]
    assert all(m["x"].op == "placeholder" for m in found)


def test_in_place_spellings_are_their_own_op():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(x * 2)

    gm = traced(InPlace())
    assert P.find(gm, P.Rule(lambda x: torch.relu(x), lambda x: torch.relu(x))) == []
    assert matched(gm, P.Rule(lambda x: F.relu(x, inplace=True), lambda x: torch.relu(x))) == [["act"]]


class ConvRelu(nn.Module):
    def __init__(self, kernel_size=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, kernel_size, groups=groups)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


class ConvReluPattern(nn.Module):
    """A pattern written as a module: its submodules match call_module nodes by type, whatever their sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return F.relu(self.conv(x))


def test_call_module_pattern_matches_by_module_type():
    gm = traced(ConvRelu(kernel_size=3))
    assert matched(gm, P.Rule(ConvReluPattern(), lambda x: torch.relu(x))) == [["conv", "relu"]]
    linear = traced(_Wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU())))
    assert P.find(linear, P.Rule(ConvReluPattern(), lambda x: torch.relu(x))) == []


def test_module_attribute_constraint_rejects_a_near_miss():
    rule = P.Rule(lambda x: torch.relu(P.module(nn.Conv2d, kernel_size=(1, 1), name="conv")(x)),
                  lambda x: torch.relu(x))
    assert len(P.find(traced(ConvRelu(kernel_size=1)), rule)) == 1
    assert P.find(traced(ConvRelu(kernel_size=3)), rule) == []  # a Conv2d, but 3x3
    by_name = P.Rule(lambda x: torch.relu(P.module(nn.Conv2d, name="conv")(x)), lambda x: torch.relu(x),
                     where={"conv": P.attrs(groups=lambda g: g > 1)})
    assert P.find(traced(ConvRelu(groups=1)), by_name) == []
    assert len(P.find(traced(ConvRelu(groups=2)), by_name)) == 1


def test_meta_constraint_rejects_the_wrong_dtype_and_rank():
    rule = P.Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), where={"x": P.meta(dtype=torch.float32)})
    swish = traced(lambda x: x * torch.sigmoid(x), torch.randn(2, 3))
    assert len(P.find(swish, rule)) == 1
    assert P.find(traced(lambda x: x * torch.sigmoid(x), torch.randn(2, 3, dtype=torch.float64)), rule) == []
    by_rank = P.Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), where={"x": P.meta(shape=(None, 3))})
    assert len(P.find(swish, by_rank)) == 1
    assert P.find(traced(lambda x: x * torch.sigmoid(x), torch.randn(2, 4)), by_rank) == []
    assert P.find(traced(lambda x: x * torch.sigmoid(x)), rule) == []  # no shapes known: no match


def test_parameters_are_wildcards_that_must_bind_consistently():
    assert len(P.find(traced(lambda x: x.sigmoid() * x), SILU)) == 1  # operands of * in either order
    assert P.find(traced(lambda x: (x + 1) * torch.sigmoid(x)), SILU) == []  # x bound twice, differently
    scale = P.Rule(lambda x, c: x * c, lambda x, c: x * c)
    by_constant = P.find(traced(lambda x: torch.relu(x) * 2.0), scale)
    assert [m["c"] for m in by_constant] == [2.0]  # a parameter binds a constant too


def test_any_node_wildcard_matches_any_call_with_a_predicate():
    def not_a_module(x):
        return torch.sigmoid(P.any_node(where=lambda n: n.op != "call_module", name="inner")(x))

    def anything(x):
        return torch.sigmoid(P.any_node(name="inner")(x))

    by_function = traced(lambda x: torch.sigmoid(torch.tanh(x) + 0))
    by_module = traced(_Wrap(nn.Sequential(nn.Tanh(), nn.Sigmoid())))
    for rule, expected in ((not_a_module, ["add", None]), (anything, ["add", "fn_0"])):
        rule = P.Rule(rule, lambda x: torch.sigmoid(x))
        found = [next((m["inner"].name for m in P.find(gm, rule)), None) for gm in (by_function, by_module)]
        assert found == expected
    no_inputs = P.Rule(lambda: torch.sigmoid(P.any_node()()), build=lambda m: None)
    assert [m.nodes[0].name for m in P.find(by_function, no_inputs)] == ["add"]


def test_one_match_per_node_in_deterministic_order():
    chain = traced(lambda x: torch.relu(torch.relu(torch.relu(x))))
    double = P.Rule(lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x))
    # relu(relu(x)) fits at relu_2 and at relu_1; they would share relu_1: only the later one is taken
    assert matched(chain, double) == [["relu_1", "relu_2"]]
    def two_swishes(x):
        y = x + 1
        return torch.sigmoid(x) * x + torch.sigmoid(y) * y

    two = traced(two_swishes)
    first, again = matched(two, SILU), matched(two, SILU)
    assert first == again == [["sigmoid_1", "mul_1"], ["sigmoid", "mul"]]  # from the graph's end backwards


def test_inner_nodes_used_outside_the_match_do_not_match():
    def fn(x):
        s = torch.sigmoid(x)
        return x * s + s  # the sigmoid is needed outside the match

    gm = traced(fn)
    assert P.find(gm, SILU) == []


def test_rewrite_splices_the_replacement_and_counts_matches():
    def fn(x):
        y = x * 2
        return torch.relu(x * torch.sigmoid(x)) + y * torch.sigmoid(y)

    gm = traced(fn)
    result = P.rewrite(gm, [SILU])
    gm.recompile()
    assert result.modified and result.matches == {"mul(x, sigmoid(x)) -> silu(x)": 2}
    assert [n.target for n in gm.graph.nodes].count(F.silu) == 2
    assert torch.sigmoid not in [n.target for n in gm.graph.nodes]
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), fn(x))


def test_builder_callback_gets_the_match_and_may_decline():
    seen = []

    def keep_wide_only(m):
        seen.append(m.module("conv").out_channels)
        if m.module("conv").out_channels < 8:
            return None  # declined: the graph is left alone
        return m.graph.call_function(torch.relu, (m.graph.call_module(m["conv"].target, (m["x"],)),))

    rule = P.Rule(lambda x: torch.relu(P.module(nn.Conv2d, name="conv")(x)), build=keep_wide_only)
    gm = traced(ConvRelu())
    result = P.rewrite(gm, rule)
    assert seen == [4] and not result.modified and [n.op for n in gm.graph.nodes].count("call_module") == 2


def test_no_match_across_a_mutation_between_its_nodes():
    def fn(x):
        y = x.clone()
        s = torch.sigmoid(y)
        y.mul_(2)  # silu(y) computed at the mul would read the doubled y
        return y * s

    gm = traced(fn)
    assert P.find(gm, SILU) == []


def test_graphs_from_make_fx_match_too():
    gm = make_fx(lambda x: x * torch.sigmoid(x))(torch.randn(3))
    assert {str(n.target) for n in gm.graph.nodes if n.op == "call_function"} == {"aten.sigmoid.default",
                                                                                   "aten.mul.Tensor"}
    rule = P.Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), where={"x": P.meta(rank=1)})
    assert len(P.find(gm, rule)) == 1  # the dtype/shape come from make_fx's meta["val"]


def test_rule_errors_say_what_to_do():
    with pytest.raises(fxforge.ConfigError, match="exactly one of replacement= .* or build="):
        P.Rule(lambda x: torch.relu(x))
    with pytest.raises(fxforge.ConfigError, match="'y' is not a pattern input"):
        P.Rule(lambda x: torch.relu(x), lambda y: y)
    with pytest.raises(fxforge.ConfigError, match="names 'sigmod', which is not a pattern node; names: x, sigmoid"):
        P.Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), where={"sigmod": P.meta(rank=2)})
    with pytest.raises(fxforge.ConfigError, match="return one value"):
        P.Rule(lambda x: x, lambda x: x)
    with pytest.raises(fxforge.ConfigError, match="inside a pattern"):
        P.module(nn.Conv2d)(torch.randn(1))


def test_user_rewrite_pass_reports_its_match_counts():
    @fxforge.graph_pass(name="test-patterns-silu")
    def fuse_silu(gm, ctx):
        return P.rewrite(gm, SILU, ctx)

    class Swish(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y * torch.sigmoid(y)

    model, x = Swish().eval(), torch.randn(2, 4)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, pipeline="test-patterns-silu,fold-bn,fuse-linear")
    record = compiled.report.passes[0]
    assert record.matches == {"mul(x, sigmoid(x)) -> silu(x)": 1}
    assert "rule mul(x, sigmoid(x)) -> silu(x): 1 match(es)" in str(compiled.report)
    assert [type(m).__name__ for m in compiled.graph_module.children()] == ["FusedLinear"]
    torch.testing.assert_close(compiled(x), model(x))
    node = next(n for n in compiled.graph_module.graph.nodes if n.op == "call_module")
    assert node.meta["fxforge"]["rewritten_by"] == "fuse-linear"

import operator

import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from fxforge.graph.fused import FusedConv, FusedLinear
from helpers import randomize_bn, rel_error, run_pipeline

PIPELINE = "normalize-inplace,normalize-relu,fold-bn,fuse-conv,fuse-linear"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def _fused(gm):
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (FusedConv, FusedLinear))}


def test_conv_relu_and_conv_add_relu_fuse_in_a_residual_block():
    model = randomize_bn(Residual()).eval()
    x = torch.randn(2, 4, 7, 7)
    compiled, expected, actual = run_pipeline(model, PIPELINE, x)
    fused = _fused(compiled.graph_module)
    assert {k: m.post_ops for k, m in fused.items()} == {"conv1": "relu", "conv2": "add+relu"}
    assert [n.op for n in compiled.graph_module.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    assert rel_error(actual, expected) <= 1e-5


def test_post_ops_option_restricts_what_fuses():
    model = randomize_bn(Residual()).eval()
    compiled, expected, actual = run_pipeline(model, "normalize-inplace,fold-bn,fuse-conv{post_ops=relu}",
                                              torch.randn(1, 4, 5, 5))
    assert {k: m.post_ops for k, m in _fused(compiled.graph_module).items()} == {"conv1": "relu"}
    assert operator.add in [n.target for n in compiled.graph_module.graph.nodes]
    assert rel_error(actual, expected) <= 1e-5


class ConvAddNoRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, y):
        return y + self.conv(x)  # conv is the second operand


def test_conv_add_with_conv_as_second_operand():
    compiled, expected, actual = run_pipeline(ConvAddNoRelu().eval(), "fold-bn,fuse-conv",
                                              torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))
    assert [m.post_ops for m in _fused(compiled.graph_module).values()] == ["add"]
    assert rel_error(actual, expected) <= 1e-6


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, bias):
        return F.relu(self.conv(x) + bias)  # bias is [1, 3, 1, 1]: a broadcast, not a residual


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.relu(self.conv(x)) - self.conv(x)


def test_broadcast_add_does_not_fuse_but_relu_alone_cannot_either():
    compiled, expected, actual = run_pipeline(Broadcast().eval(), "normalize-relu,fold-bn,fuse-conv",
                                              torch.randn(1, 3, 4, 4), torch.randn(1, 3, 1, 1))
    assert _fused(compiled.graph_module) == {}
    assert rel_error(actual, expected) <= 1e-6


def test_conv_with_several_users_or_shared_module_does_not_fuse():
    for model in (ConvUsedTwice(), SharedConv()):
        compiled, expected, actual = run_pipeline(model.eval(), "fold-bn,fuse-conv", torch.randn(1, 3, 4, 4))
        assert _fused(compiled.graph_module) == {}
        assert rel_error(actual, expected) <= 1e-6


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_linear_relu_fuses_and_last_linear_does_not():
    compiled, expected, actual = run_pipeline(MLP().eval(), PIPELINE, torch.randn(4, 6))
    assert {k: type(m).__name__ for k, m in _fused(compiled.graph_module).items()} == {"fc1": "FusedLinear"}
    assert rel_error(actual, expected) <= 1e-6


class ConvAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), act

    def forward(self, x):
        return self.act(self.conv(x))


def test_activation_spellings_fuse_into_conv():
    cases = {
        "relu6": nn.ReLU6(inplace=True),
        "hardswish": nn.Hardswish(),
        "silu": nn.SiLU(inplace=True),
    }
    for expected_ops, act in cases.items():
        compiled, expected, actual = run_pipeline(ConvAct(act).eval(), "fold-bn,fuse-conv", torch.randn(1, 3, 6, 6))
        assert [m.post_ops for m in _fused(compiled.graph_module).values()] == [expected_ops]
        assert rel_error(actual, expected) <= 1e-6


class ConvHardtanh(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.conv, self.lo, self.hi = nn.Conv2d(3, 4, 3), lo, hi

    def forward(self, x):
        return F.hardtanh(self.conv(x), self.lo, self.hi)


def test_hardtanh_fuses_only_as_relu6():
    x = torch.randn(1, 3, 5, 5)
    fused_06 = _fused(run_pipeline(ConvHardtanh(0.0, 6.0).eval(), "fold-bn,fuse-conv", x)[0].graph_module)
    assert [m.post_ops for m in fused_06.values()] == ["relu6"]
    compiled, expected, actual = run_pipeline(ConvHardtanh(-1.0, 1.0).eval(), "fold-bn,fuse-conv", x)
    assert _fused(compiled.graph_module) == {}
    assert rel_error(actual, expected) <= 1e-6


class ConvAddRelu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return F.relu6(self.conv(x) + x)


def test_only_relu_follows_an_add_in_one_fused_op():
    compiled, expected, actual = run_pipeline(ConvAddRelu6().eval(), "fold-bn,fuse-conv", torch.randn(1, 3, 4, 4))
    assert [m.post_ops for m in _fused(compiled.graph_module).values()] == ["add"]
    assert F.relu6 in [n.target for n in compiled.graph_module.graph.nodes]
    assert rel_error(actual, expected) <= 1e-6


def test_linear_silu_fuses():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.silu(self.fc(x))

    compiled, expected, actual = run_pipeline(M().eval(), "fold-bn,fuse-linear", torch.randn(2, 4))
    assert [m.post_ops for m in _fused(compiled.graph_module).values()] == ["silu"]
    assert rel_error(actual, expected) <= 1e-6


class MutateAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.conv = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)

    def forward(self, x):
        t = self.c0(x)
        a = self.conv(t)
        torch.relu_(t)  # mutates the conv's input after the conv read it
        return torch.relu(a)


def test_conv_relu_does_not_fuse_across_a_mutation_of_the_conv_input():
    """Found by the property tests: fuse-conv ran the fused conv at the relu, after ``relu_(t)`` had mutated
    the conv's input."""
    model, x = MutateAfterConv().eval(), torch.randn(1, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x.clone())
    with torch.no_grad():
        expected = model(x.clone())
    assert rel_error(compiled(x.clone()), expected) <= 1e-4

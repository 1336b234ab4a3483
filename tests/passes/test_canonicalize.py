"""remove-noops, normalize-inplace, normalize-relu, normalize-gelu, dce: each fires where it should, nowhere else."""

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from helpers import function_targets, module_types, rel_error, run_pipeline


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.ident, self.fc = nn.Dropout(0.3), nn.Identity(), nn.Linear(4, 4)

    def forward(self, x):
        y = self.ident(self.drop(self.fc(x)))
        return F.dropout(y, 0.5, training=self.training)


def test_remove_noops_removes_dropout_and_identity():
    compiled, expected, actual = run_pipeline(Noops().eval(), "remove-noops", torch.randn(2, 4))
    assert module_types(compiled.graph_module) == ["Linear"]
    assert F.dropout not in function_targets(compiled.graph_module)
    assert torch.equal(actual, expected)


class TrainingDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5)  # training=True by default: not a no-op even in eval mode


def test_remove_noops_keeps_functional_dropout_that_is_training():
    compiled, _, _ = run_pipeline(TrainingDropout().eval(), "remove-noops", torch.randn(2, 4))
    assert F.dropout in function_targets(compiled.graph_module)
    assert compiled.report.passes[0].modified is False


class Relus(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.relu = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        a = self.relu(self.fc(x))
        b = F.relu(a - 1)
        return torch.relu(b * 2) + (b + 3).relu()


def test_normalize_relu_unifies_spellings():
    compiled, expected, actual = run_pipeline(Relus().eval(), "normalize-relu", torch.randn(2, 4))
    targets = function_targets(compiled.graph_module)
    assert targets.count(torch.relu) == 4 and F.relu not in targets
    assert module_types(compiled.graph_module) == ["Linear"]
    assert [n for n in compiled.graph_module.graph.nodes if n.op == "call_method"] == []
    assert torch.equal(actual, expected)


class SafeInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        y += x
        return self.relu(y)


class UnsafeInplace(nn.Module):
    """relu_ mutates a value that is read again afterwards, and add_ mutates the user's input.

    (``x += 1`` would not do: torch.fx traces ``+=`` on a tensor as an out-of-place add.)
    """

    def forward(self, x):
        y = x * 2
        z = torch.relu_(y)
        x.add_(1)
        return z + y + x


def test_normalize_inplace_fires_on_fresh_single_use_values():
    compiled, expected, actual = run_pipeline(SafeInplace().eval(), "normalize-inplace", torch.randn(1, 3, 4, 4))
    targets = function_targets(compiled.graph_module)
    assert operator.add in targets and torch.relu in targets and torch.relu_ not in targets
    assert torch.allclose(actual, expected)


def test_normalize_inplace_keeps_observable_mutations():
    x = torch.randn(1, 3)
    compiled = run_pipeline(UnsafeInplace().eval(), "normalize-inplace", x.clone())[0]
    targets = function_targets(compiled.graph_module)
    assert torch.relu_ in targets
    assert [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_method"] == ["add_"]
    a, b = x.clone(), x.clone()
    with torch.inference_mode():
        assert torch.equal(compiled(a), UnsafeInplace()(b))
    assert torch.equal(a, b)  # the input was mutated the same way


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, buf):
        self.fc(x) * 2  # dead: its result is never used
        buf.add_(1)  # dead result, live side effect
        return x + 1


def test_dce_removes_dead_nodes_and_keeps_side_effects():
    x, buf = torch.randn(2, 3), torch.zeros(3)
    compiled = run_pipeline(Dead().eval(), "dce", x, buf.clone())[0]
    gm = compiled.graph_module
    assert module_types(gm) == [] and operator.mul not in function_targets(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["add_"]
    with torch.inference_mode():
        compiled(x, buf)
    assert torch.equal(buf, torch.ones(3))
    assert compiled.report.passes[0].modified


def test_dce_does_not_fire_on_live_graph():
    compiled, expected, actual = run_pipeline(Relus().eval(), "dce", torch.randn(2, 4))
    assert compiled.report.passes[0].modified is False
    assert rel_error(actual, expected) == 0


def test_remove_noops_removes_eval_stochastic_depth():
    torchvision = pytest.importorskip("torchvision")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sd = nn.Linear(4, 4), torchvision.ops.StochasticDepth(0.2, "row")

        def forward(self, x):
            return self.sd(self.fc(x)) + x

    compiled, expected, actual = run_pipeline(Block().eval(), "remove-noops", torch.randn(2, 4))
    assert [getattr(t, "__name__", "") for t in function_targets(compiled.graph_module)] == ["add"]
    assert torch.equal(actual, expected)


class DeadPrivateMutation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        y = self.fc(x)
        y += 1  # mutates a value nothing else reads, and the result is unused: dead
        return x * 2


def test_dce_removes_unused_inplace_op_on_a_private_value():
    compiled, expected, actual = run_pipeline(DeadPrivateMutation().eval(), "dce", torch.randn(2, 3))
    assert module_types(compiled.graph_module) == [] and operator.iadd not in function_targets(compiled.graph_module)
    assert torch.equal(actual, expected)


class DeadAliasChain(nn.Module):
    """Found by the property tests: dead in-place chains must go in one dce run (idempotent pipeline)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        y = self.fc(x)
        y + x  # a dead reader of y, before the mutation
        y += y  # in-place chain on y: dead, nobody reads y afterwards
        y += x
        return x * 2


def test_dce_removes_dead_inplace_chains_in_one_run():
    compiled, expected, actual = run_pipeline(DeadAliasChain().eval(), "dce", torch.randn(2, 3))
    assert module_types(compiled.graph_module) == []
    assert [n.op for n in compiled.graph_module.graph.nodes] == ["placeholder", "call_function", "output"]
    assert torch.equal(actual, expected)


class InplaceSiluAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 3, 1), nn.SiLU(inplace=True)

    def forward(self, x):
        a = self.conv(x)
        b = self.act(a)  # returns a itself, mutated
        b += 1  # so this mutates a too
        return a


def test_normalize_inplace_treats_an_in_place_activation_result_as_an_alias_of_its_input():
    model = InplaceSiluAlias().eval()
    x = torch.randn(1, 3, 4, 4)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert rel_error(compiled(x), model(x)) <= 1e-5


class Promote(nn.Module):
    def forward(self, a16, x32):
        y = a16 * 2
        y += x32  # in place: stays float16 (y + x32 would be float32)
        return y


def test_normalize_inplace_keeps_the_dtype_of_an_in_place_op():
    a, x = torch.randn(2, 3).half(), torch.randn(2, 3)
    compiled = fxforge.compile(Promote().eval(), "cpu", example_inputs=(a, x))
    out = compiled(a, x)
    assert out.dtype == torch.float16
    assert torch.equal(out, Promote()(a, x))


class Counter(nn.Module):
    """Opaque to fxforge (kept as a leaf): counts its calls, a side effect."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


class CountsButIgnores(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = Counter()

    def forward(self, x):
        self.counter(x)  # result unused
        return x + 1


def test_dce_keeps_unused_calls_of_opaque_modules():
    compiled = fxforge.compile(CountsButIgnores().eval(), "cpu", example_inputs=torch.randn(2),
                               leaf_modules=[Counter])
    assert [n.op for n in compiled.graph_module.graph.nodes].count("call_module") == 1


class DropoutBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.drop, self.bn = nn.Conv2d(3, 3, 1), nn.Dropout(), nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(self.drop(self.conv(x))))


def test_remove_noops_after_fold_bn_invalidates_bn_folded():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(fxforge.PassError, match="requires \\['bn-folded'\\]"):
        fxforge.compile(DropoutBetween().eval(), "cpu", example_inputs=x, pipeline="fold-bn,remove-noops,fuse-conv")
    fxforge.compile(DropoutBetween().eval(), "cpu", example_inputs=x, pipeline="remove-noops,fold-bn,fuse-conv")


class GeluNew(nn.Module):
    """transformers' gelu_new, spelled out in two operand orders, and a near miss (0.05 for 0.044715) that must stay."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        x = self.fc(x)
        a = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
        b = (1.0 + torch.tanh((x + x**3 * 0.044715) * math.sqrt(2.0 / math.pi))) * (x * 0.5)
        miss = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.05 * torch.pow(x, 3.0))))
        return a + b + miss


def test_normalize_gelu_makes_the_spelled_out_tanh_gelu_one_node():
    compiled, expected, actual = run_pipeline(GeluNew().eval(), "normalize-gelu", torch.randn(2, 4))
    gelus = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.aten.gelu.default]
    assert len(gelus) == 2 and all(n.kwargs == {"approximate": "tanh"} for n in gelus)
    assert function_targets(compiled.graph_module).count(torch.tanh) == 1  # the near miss is left alone
    assert rel_error(actual, expected) <= 1e-6

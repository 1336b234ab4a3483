"""Regressions of the compile foundation (pass manager, canonicalizing passes, lowering, layout, pass registry),
each on a minimal model."""

import pytest
import torch
from torch import nn

import fxforge
from helpers import randomize_bn, rel_error


class ConvBnSilu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_verify_none_still_regenerates_the_code_after_each_pass():
    model = randomize_bn(ConvBnSilu()).eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, verify="none")
    assert rel_error(compiled(x), model(x)) <= 1e-5


class InplaceSiluAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 3, 1), nn.SiLU(inplace=True)

    def forward(self, x):
        a = self.conv(x)
        b = self.act(a)  # returns a itself, mutated
        b += 1  # so this mutates a too
        return a


def test_inplace_activation_output_is_an_alias_not_a_fresh_value():
    model = InplaceSiluAlias().eval()
    x = torch.randn(1, 3, 4, 4)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert rel_error(compiled(x), model(x)) <= 1e-5


class Promote(nn.Module):
    def forward(self, a16, x32):
        y = a16 * 2
        y += x32  # in place: stays float16 (y + x32 would be float32)
        return y


def test_normalize_inplace_does_not_change_dtypes():
    a, x = torch.randn(2, 3).half(), torch.randn(2, 3)
    compiled = fxforge.compile(Promote().eval(), "cpu", example_inputs=(a, x))
    out = compiled(a, x)
    assert out.dtype == torch.float16
    assert torch.equal(out, Promote()(a, x))


class ViewHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))  # needs NCHW-contiguous strides


def test_view_after_a_lowered_conv_works():
    model = ViewHead().eval()
    x = torch.randn(2, 3, 5, 5)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert rel_error(compiled(x), model(x)) <= 1e-5


class Double(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return x * 2, self.conv(x)


def test_outputs_keep_the_layout_eager_gives():
    model = Double().eval()
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    for got, want in zip(compiled(x), model(x), strict=True):
        assert got.stride() == want.stride()
    plain = torch.randn(1, 3, 4, 4)
    compiled = fxforge.compile(model, "cpu", example_inputs=plain)
    assert all(out.is_contiguous() for out in compiled(plain))


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


def test_remove_noops_after_fold_bn_asks_for_fold_bn_again():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(fxforge.PassError, match="requires \\['bn-folded'\\]"):
        fxforge.compile(DropoutBetween().eval(), "cpu", example_inputs=x, pipeline="fold-bn,remove-noops,fuse-conv")
    fxforge.compile(DropoutBetween().eval(), "cpu", example_inputs=x, pipeline="remove-noops,fold-bn,fuse-conv")


def test_load_state_dict_and_to_refresh_the_prepacked_weights():
    model = ViewHead().eval()
    x = torch.randn(2, 3, 5, 5)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    state = {k: v * 2 if k.endswith("conv.weight") else v for k, v in compiled.state_dict().items()}
    compiled.load_state_dict(state)
    doubled = ViewHead().eval()
    doubled.load_state_dict({**model.state_dict(), "conv.weight": model.conv.weight * 2})
    assert rel_error(compiled(x), doubled(x)) <= 1e-5
    compiled.to(torch.float32)  # a no-op conversion still leaves a runnable, correct module
    assert rel_error(compiled(x), doubled(x)) <= 1e-5


def test_leaf_module_path_typo_is_a_config_error():
    with pytest.raises(fxforge.ConfigError, match="no submodule 'convv'.*Did you mean 'conv'"):
        fxforge.compile(ViewHead().eval(), "cpu", example_inputs=torch.randn(1, 3, 5, 5), leaf_modules=["convv"])


def test_redefining_a_pass_replaces_it_and_a_clash_is_an_error():
    def define():
        @fxforge.graph_pass(name="test-redefined")
        def redefined(gm, ctx):
            return False

        return redefined

    first, second = define(), define()  # same module and qualname: the second replaces the first
    assert first is not second and fxforge.registered_passes()["test-redefined"] is second
    with pytest.raises(fxforge.ConfigError, match="already registered.*another name"):
        fxforge.graph_pass(name="fold-bn")(lambda gm, ctx: False)


@fxforge.graph_pass(name="test-break-runtime")
def break_runtime(gm, ctx):
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    conv.args = (conv.args[0], conv.args[0])  # a conv with two inputs: lints fine, fails when run
    return True


def test_a_graph_that_verifies_but_does_not_run_is_a_typed_error():
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(fxforge.CompileError, match="failed on the example inputs.*verify='numeric'"):
        fxforge.compile(ViewHead().eval(), "cpu", example_inputs=x, pipeline="test-break-runtime")
    with pytest.raises(fxforge.NumericMismatchError, match="after pass 'test-break-runtime' the model no longer runs"):
        fxforge.compile(ViewHead().eval(), "cpu", example_inputs=x, pipeline="test-break-runtime", verify="numeric")

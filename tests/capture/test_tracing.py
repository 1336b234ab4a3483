import pytest
import torch
from torch import nn

import fxforge
from helpers import rel_error


class DataDependent(nn.Module):
    """Python control flow on a tensor value: untraceable."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class WithFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, return_features=False, scale=None):
        y = self.conv(x)
        if return_features:
            return y
        if scale is not None:
            y = y * scale
        return torch.relu(y).mean((2, 3))


class HasUntraceableChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(torch.relu(self.bn(self.conv(x))))


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.max() > 100:  # data-dependent, in the root's own forward
            y = y / 2
        return y


def test_non_tensor_defaults_are_bound_and_reported():
    m = WithFlag().eval()
    x = torch.randn(2, 3, 8, 8)
    c = fxforge.compile(m, "cpu", example_inputs=x)
    assert c.report.bound_arguments == {"return_features": "False", "scale": "None"}
    assert rel_error(c(x), m(x)) <= 1e-5


def test_untraceable_submodule_becomes_a_leaf_with_its_reason():
    m = HasUntraceableChild().eval()
    x = torch.randn(1, 3, 8, 8)
    c = fxforge.compile(m, "cpu", example_inputs=x)
    assert list(c.report.leaf_modules) == ["gate"]
    assert "test_tracing.py" in c.report.leaf_modules["gate"]
    assert "leaf" in str(c.report)
    assert rel_error(c(x), m(x)) <= 1e-5
    # the rest of the model was still optimized around the leaf
    types = [type(mod).__name__ for _, mod in c.graph_module.named_modules()]
    assert "BatchNorm2d" not in types and "DataDependent" in types


def test_untraceable_root_raises_trace_error_with_file_line_and_options():
    with pytest.raises(fxforge.TraceError) as info:
        fxforge.compile(UntraceableRoot().eval(), "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "test_tracing.py" in msg and "if y.max() > 100" in msg
    assert "leaf_modules=" in msg and "concrete_args=" in msg


def test_user_leaf_modules_and_concrete_args_are_honoured():
    m = WithFlag().eval()
    x = torch.randn(1, 3, 8, 8)
    c = fxforge.compile(m, "cpu", example_inputs=x, leaf_modules=[nn.Conv2d], concrete_args={"return_features": True})
    assert c.report.bound_arguments["return_features"] == "True"
    assert rel_error(c(x), m(x, return_features=True)) <= 1e-5


def test_shapes_and_dtypes_recorded_in_node_meta():
    m = WithFlag().eval()
    gm = fxforge.trace(m, (torch.randn(2, 3, 8, 8),)).gm
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.randn(2, 3, 8, 8))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert tuple(conv.meta["tensor_meta"].shape) == (2, 4, 6, 6)
    assert conv.meta["tensor_meta"].dtype == torch.float32


def test_compile_records_shapes_for_every_tensor_node():
    m = WithFlag().eval()
    c = fxforge.compile(m, "cpu", example_inputs=torch.randn(2, 3, 8, 8), pipeline="remove-noops")
    nodes = [n for n in c.graph_module.graph.nodes if n.op in ("placeholder", "call_module", "call_function")]
    tensor_nodes = [n for n in nodes if n.name.startswith(("x", "conv", "relu", "mean"))]
    assert tensor_nodes and all("tensor_meta" in n.meta for n in tensor_nodes)


def test_wrong_number_of_example_inputs_is_a_config_error():
    with pytest.raises(fxforge.ConfigError, match="takes 3 positional arguments"):
        fxforge.compile(WithFlag().eval(), "cpu", example_inputs=tuple(torch.randn(1) for _ in range(4)))


class AugmentedAlias(nn.Module):
    def forward(self, x):
        y = x * 1
        alias = y
        y += 1
        y -= 0.5
        y *= 3
        y /= 2
        y //= 1
        y **= 2
        return alias  # sees every mutation, as in eager


def test_every_augmented_assignment_keeps_its_in_place_meaning():
    x = torch.randn(5) * 4
    compiled = fxforge.compile(AugmentedAlias().eval(), "cpu", example_inputs=x)
    assert torch.equal(compiled(x), AugmentedAlias()(x))


class ConvAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.conv(x)
        b = a
        b += 1  # mutates a too
        return a


def test_augmented_assignment_on_a_conv_output_is_seen_through_its_alias():
    """Found by the property tests: torch.fx traces ``b += 1`` as ``b + 1``, so the alias ``a`` never saw the
    sum."""
    model, x = ConvAlias().eval(), torch.randn(1, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x.clone())
    with torch.no_grad():
        expected = model(x.clone())
    assert rel_error(compiled(x.clone()), expected) <= 1e-4


def test_leaf_module_path_typo_is_a_config_error():
    with pytest.raises(fxforge.ConfigError, match="no submodule 'convv'.*Did you mean 'conv'"):
        fxforge.compile(ConvAlias().eval(), "cpu", example_inputs=torch.randn(1, 3, 5, 5), leaf_modules=["convv"])

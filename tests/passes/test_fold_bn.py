import pytest
import torch
from torch import nn

import fxforge
from helpers import module_types, randomize_bn, rel_error, run_pipeline


class LayerBN(nn.Module):
    def __init__(self, layer, bn):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return self.bn(self.layer(x))


CASES = {
    "conv1d": (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 9)),
    "conv2d-groups-dilation-nobias": (
        nn.Conv2d(4, 6, 3, groups=2, dilation=2, bias=False), nn.BatchNorm2d(6), (2, 4, 11, 11)),
    "conv3d": (nn.Conv3d(3, 4, 3, stride=2), nn.BatchNorm3d(4), (1, 3, 7, 7, 7)),
    "convtranspose1d": (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 5)),
    "convtranspose2d-groups": (nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    "convtranspose3d": (nn.ConvTranspose3d(2, 4, 2), nn.BatchNorm3d(4), (1, 2, 3, 3, 3)),
    "linear-bn1d": (nn.Linear(5, 7), nn.BatchNorm1d(7), (3, 5)),
    "bn-affine-false": (nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5, affine=False), (1, 3, 4, 4)),
}


@pytest.mark.parametrize("case", CASES)
def test_fold_bn_fires_and_preserves_outputs(case):
    layer, bn, shape = CASES[case]
    model = randomize_bn(LayerBN(layer, bn)).eval()
    x = torch.randn(shape)
    compiled, expected, actual = run_pipeline(model, "fold-bn", x)
    assert not any(t.startswith("BatchNorm") for t in module_types(compiled.graph_module))
    assert rel_error(actual, expected) <= 1e-5
    assert isinstance(model.bn, nn.modules.batchnorm._BatchNorm)  # the user's model keeps its BN


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class ReluBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class ConvOutputUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * y


class LinearBN3d(nn.Module):
    """BatchNorm1d on (N, C, L): normalizes dim 1, which is not Linear's feature dim."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("model_cls, reason", [
    (SharedConv, "called more than once"),
    (ReluBetween, "is not a conv/linear layer"),
    (ConvOutputUsedTwice, "also used elsewhere"),
    (LinearBN3d, "not 2-D"),
])
def test_fold_bn_does_not_fire_and_says_why(model_cls, reason):
    model = randomize_bn(model_cls()).eval()
    x = torch.randn(2, 4, 4) if model_cls is LinearBN3d else torch.randn(2, 3, 6, 6)
    compiled, expected, actual = run_pipeline(model, "fold-bn", x)
    assert "BatchNorm2d" in module_types(compiled.graph_module) or "BatchNorm1d" in module_types(compiled.graph_module)
    assert any(reason in note for note in compiled.report.passes[0].notes)
    assert compiled.report.passes[0].modified is False
    assert rel_error(actual, expected) <= 1e-6


def test_bn_without_running_stats_is_kept():
    model = LayerBN(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    compiled, expected, actual = run_pipeline(model, "fold-bn", torch.randn(2, 3, 4, 4))
    assert "BatchNorm2d" in module_types(compiled.graph_module)
    assert "track_running_stats" in compiled.report.passes[0].notes[0]


def test_fold_is_computed_in_float64():
    """A BN with tiny variance amplifies float32 rounding in the fold; float64 math keeps it exact-ish."""
    model = LayerBN(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, eps=1e-12)).eval()
    model.bn.running_var.fill_(1e-8)
    model.bn.running_mean.normal_()
    x = torch.randn(1, 8, 6, 6)
    _, expected, actual = run_pipeline(model, "fold-bn", x)
    assert rel_error(actual, expected) <= 1e-5


class DeadUserOfConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        _unused = y + 1  # a second user of y: fold-bn would skip the BN, but dce removes this first
        return self.bn(y)


def test_a_dead_second_user_of_the_conv_does_not_leave_a_foldable_bn():
    """Found by the property tests: dce removed the conv's dead second user after fold-bn, leaving a foldable
    BN, and the 'bn-folded' invariant failed the compile."""
    model, x = randomize_bn(DeadUserOfConv()).eval(), torch.randn(1, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x.clone())
    assert "BatchNorm2d" not in module_types(compiled.graph_module)
    with torch.no_grad():
        expected = model(x.clone())
    assert rel_error(compiled(x.clone()), expected) <= 1e-4

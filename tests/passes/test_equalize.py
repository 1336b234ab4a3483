"""equalize: cross-layer equalization keeps the function and evens out per-channel weight ranges."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxforge
from helpers import module_types, one_intra_op_thread, rel_error, run_pipeline

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class Pair(nn.Module):
    def __init__(self, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act, self.fc = activation or nn.ReLU(), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv2(self.act(self.conv1(x)))), 1))


def unbalanced(activation: nn.Module | None = None) -> nn.Module:
    """conv1's output channels scaled from 0.01x to 100x, conv2's inputs inversely: same function."""
    torch.manual_seed(0)
    model = Pair(activation).eval()
    with torch.no_grad():
        f = torch.logspace(-2, 2, 8)
        model.conv1.weight.mul_(f.view(-1, 1, 1, 1))
        model.conv1.bias.mul_(f)
        model.conv2.weight.div_(f.view(1, -1, 1, 1))
    return model


def ranges(conv1: nn.Conv2d, conv2: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    return conv1.weight.abs().flatten(1).amax(1), conv2.weight.abs().transpose(0, 1).flatten(1).amax(1)


def test_equalize_keeps_the_function_and_equalizes_the_ranges():
    model = unbalanced()
    before = ranges(model.conv1, model.conv2)
    compiled, eager, out = run_pipeline(model, "normalize-relu,fold-bn,equalize", X)
    assert rel_error(out, eager) < 1e-5
    r1, r2 = ranges(compiled.graph_module.conv1, compiled.graph_module.conv2)
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
    assert (r1.max() / r1.min()) < (before[0].max() / before[0].min()) / 100
    assert "equalized 1 layer pair(s)" in str(compiled.report)  # conv2 -> flatten -> fc is not a pair
    assert torch.equal(model.conv1.weight, unbalanced().conv1.weight)  # the user's model is untouched


def test_equalize_does_not_cross_relu6_or_shared_values():
    compiled, eager, out = run_pipeline(unbalanced(nn.ReLU6()), "fold-bn,equalize", X)
    assert rel_error(out, eager) < 1e-6
    assert all(p.notes == [] for p in compiled.report.passes if p.name == "equalize")


@pytest.mark.skipif("x86" not in fxforge.targets(), reason="needs the x86 engine")
def test_equalize_rescues_per_tensor_int8_weights():
    model = unbalanced()
    calibration = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    config = fxforge.QuantConfig(per_channel=False)
    sqnr = {}
    for name, extra in (("plain", None), ("equalized", {"after:fold-bn": "equalize"})):
        compiled = fxforge.compile(model, "x86", example_inputs=X, calibration=calibration, quant_config=config,
                                   extra_passes=extra)
        assert "Conv2d" not in module_types(compiled.graph_module)  # still lowered to int8 kernels
        sqnr[name] = compiled.report.quantization.model_sqnr_db
    assert sqnr["equalized"] > sqnr["plain"] + 15

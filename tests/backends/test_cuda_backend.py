import pytest
import torch
from torch import nn

import fxforge
from helpers import module_types, randomize_bn, rel_error

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_cuda_pipeline_text_is_available_without_a_gpu():
    assert "fold-bn" in fxforge.pipeline_for("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_target_without_gpu_is_backend_unavailable():
    assert "cuda" not in fxforge.targets()
    with pytest.raises(fxforge.BackendUnavailableError, match="no CUDA GPU.*Usable here: cpu"):
        fxforge.compile(Net().eval(), "cuda", example_inputs=torch.randn(1, 3, 8, 8))


def test_cuda_pipeline_runs_on_cpu_graphs():
    """The graph-level part of the CUDA pipeline is device independent: check it on CPU."""
    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, pipeline=fxforge.pipeline_for("cuda"))
    assert "BatchNorm2d" not in module_types(compiled.graph_module)
    assert rel_error(compiled(x), model(x)) <= 1e-5


@needs_gpu
def test_cuda_target_compiles_and_matches_eager_on_gpu():
    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    compiled = fxforge.compile(model, "auto", example_inputs=x)
    assert compiled.target == "cuda"
    assert next(model.parameters()).device.type == "cpu"  # the user's model stays where it was
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32, not TF32 convolutions
    try:
        out = compiled(x)
        expected = model.cuda()(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert out.device.type == "cuda"
    assert rel_error(out, expected) <= 1e-4

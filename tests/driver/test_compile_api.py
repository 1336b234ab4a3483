import pytest
import torch
from torch import nn

import fxforge
from helpers import assert_unchanged, randomize_bn, rel_error, state_snapshot


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(y.mean((2, 3))))


def test_compile_returns_a_compiled_module_with_target_pipeline_and_report():
    m = randomize_bn(Small()).eval()
    x = torch.randn(2, 3, 16, 16)
    c = fxforge.compile(m, "cpu", example_inputs=x)
    assert isinstance(c, nn.Module) and isinstance(c.graph_module, torch.fx.GraphModule)
    assert c.target == "cpu" and c.pipeline == fxforge.pipeline_for("cpu")
    assert c.report.max_rel_error <= 1e-5
    assert rel_error(c(x), m(x)) <= 1e-5


def test_auto_target_is_a_cpu_float_target_without_a_gpu():
    """The fastest float target measured here (cpu, cpu-bf16, openvino... as this machine has them), never int8."""
    from fxforge.pipeline.targets import resolve_target
    from fxforge.search.auto import candidates

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    c = fxforge.compile(Small().eval(), example_inputs=torch.randn(1, 3, 8, 8))
    assert c.target in {t.name for t in candidates(int8=False)} and resolve_target(c.target).device == "cpu"
    assert c.report.auto.chosen == c.target and c.quant_options is None


def test_forward_runs_under_inference_mode():
    c = fxforge.compile(Small().eval(), "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    assert c(torch.randn(1, 3, 8, 8)).is_inference()


def test_user_model_is_never_modified():
    m = randomize_bn(Small()).eval()
    snap = state_snapshot(m)
    fxforge.compile(m, "cpu", example_inputs=torch.randn(1, 3, 8, 8), verify="numeric")
    assert_unchanged(m, snap)


def test_train_mode_model_is_rejected_with_advice():
    m = Small()
    with pytest.raises(fxforge.ConfigError, match=r"model.eval\(\)"):
        fxforge.compile(m, "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    assert m.training  # not flipped behind the user's back


def test_unknown_target_lists_valid_ones_and_suggests():
    with pytest.raises(fxforge.ConfigError, match="Did you mean 'cpu'.*Valid targets: auto, cpu"):
        fxforge.compile(Small().eval(), "cpuu", example_inputs=torch.randn(1, 3, 8, 8))


def test_missing_example_inputs_and_bad_verify_mode():
    with pytest.raises(fxforge.ConfigError, match="example_inputs"):
        fxforge.compile(Small().eval(), "cpu")
    with pytest.raises(fxforge.ConfigError, match="verify='loud'"):
        fxforge.compile(Small().eval(), "cpu", example_inputs=torch.randn(1, 3, 8, 8), verify="loud")


def test_pipeline_text_runs_exactly_those_passes():
    c = fxforge.compile(Small().eval(), "cpu", example_inputs=torch.randn(1, 3, 8, 8), pipeline="remove-noops,fold-bn")
    assert [r.spec for r in c.report.passes] == ["remove-noops", "fold-bn"]
    assert c.pipeline == "remove-noops,fold-bn"


def test_targets_and_pipeline_for():
    assert "cpu" in fxforge.targets()
    assert fxforge.pipeline_for("cpu").endswith("lower-cpu")
    with pytest.raises(fxforge.ConfigError):
        fxforge.pipeline_for("tpu")


def test_report_text_and_files(tmp_path):
    c = fxforge.compile(randomize_bn(Small()).eval(), "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    text = str(c.report)
    assert "fold-bn" in text and "folded 1 BatchNorm" in text
    out = c.report.save(tmp_path / "r")
    assert (out / "report.json").exists() and "lower-cpu" in (out / "report.txt").read_text()


def test_compile_runs_the_model_a_fixed_number_of_times_not_once_per_pass():
    """Reference output with shape propagation, then the final check: 2 runs whatever the pipeline length."""
    calls = []
    m = randomize_bn(Small()).eval()
    m.fc.register_forward_hook(lambda *args: calls.append(1))
    fxforge.compile(m, "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    assert len(calls) == 2


class MutatesInput(nn.Module):
    def forward(self, x):
        x.add_(1)  # legal in eager: the caller sees x + 1
        return x * 2


def test_compile_leaves_example_inputs_alone():
    x = torch.zeros(2)
    compiled = fxforge.compile(MutatesInput().eval(), "cpu", example_inputs=x)
    assert torch.equal(x, torch.zeros(2)), f"example input changed to {x.tolist()}"
    assert compiled.report.max_rel_error == 0.0

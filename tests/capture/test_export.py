"""The torch.export front end and the choice between front ends (capture=), on plain torch models."""

import dataclasses

import pytest
import torch
from torch import nn

import fxforge
from helpers import module_types, rel_error


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor
    features: torch.Tensor


class TwoInputs(nn.Module):
    """Keyword inputs, a shared Linear called twice, a dict output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens, mask=None):
        h = torch.relu(self.proj(tokens))
        h = self.proj(h) * mask.unsqueeze(-1)
        return {"logits": self.head(h).mean(1), "hidden": h}


class ReturnsDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return Prediction(self.fc(f), f)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def _two_inputs():
    torch.manual_seed(0)
    return TwoInputs().eval(), {"tokens": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)}


def test_keyword_inputs_and_dict_outputs_through_export():
    model, inputs = _two_inputs()
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs, capture="export")
    out = compiled(**inputs)
    assert list(out) == ["logits", "hidden"]
    assert rel_error(out["logits"], model(**inputs)["logits"]) <= 1e-5
    assert compiled.report.front_end == "export" and "capture='export'" in compiled.report.front_end_reason
    assert "captured by export" in str(compiled.report)


def test_module_calls_come_back_as_modules_shared_ones_twice():
    model, inputs = _two_inputs()
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs, capture="export", pipeline="dce")
    graph = compiled.graph_module.graph
    calls = [str(n.target) for n in graph.nodes if n.op == "call_module"]
    assert calls.count("proj") == 2 and calls.count("head") == 1
    assert not any("linear" in str(n.target) for n in graph.nodes if n.op == "call_function")


def test_dataclass_output_keeps_its_type_and_the_passes_still_fuse():
    torch.manual_seed(0)
    model, x = ReturnsDataclass().eval(), torch.randn(2, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, capture="export")
    out, expected = compiled(x), model(x)
    assert isinstance(out, Prediction)
    assert rel_error(out.logits, expected.logits) <= 1e-4
    assert "BatchNorm2d" not in module_types(compiled.graph_module)  # folded, as after symbolic tracing


def test_auto_prefers_symbolic_tracing_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    compiled = fxforge.compile(model, "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    assert compiled.report.front_end == "symbolic"


def test_neither_front_end_gives_one_trace_error_with_both_reasons():
    with pytest.raises(fxforge.TraceError) as info:
        fxforge.compile(DataDependent().eval(), "cpu", example_inputs=torch.randn(2, 4))
    message = str(info.value)
    assert "symbolic tracing:" in message and "torch.export:" in message
    assert "if x.sum() > 0" in message and "Try:" in message


def test_capture_symbolic_does_not_fall_back():
    with pytest.raises(fxforge.TraceError) as info:
        fxforge.compile(DataDependent().eval(), "cpu", example_inputs=torch.randn(2, 4), capture="symbolic")
    assert "torch.export" not in str(info.value)


def test_unknown_capture_mode_is_a_config_error():
    with pytest.raises(fxforge.ConfigError, match="capture='fx'"):
        fxforge.compile(nn.ReLU().eval(), "cpu", example_inputs=torch.randn(2), capture="fx")


def test_calibration_items_as_keyword_dicts():
    model, inputs = _two_inputs()
    batches = [{"tokens": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)} for _ in range(3)]
    compiled = fxforge.compile(model, "x86", example_inputs=inputs, calibration=batches, capture="export")
    cosine = torch.nn.functional.cosine_similarity(compiled(**inputs)["hidden"].flatten(),
                                                   model(**inputs)["hidden"].flatten(), dim=0)
    assert not (cosine < 0.99)


def test_a_fixed_non_tensor_argument_must_be_passed_the_same():
    model, inputs = _two_inputs()
    compiled = fxforge.compile(model, "cpu", example_inputs={**inputs, "mask": inputs["mask"]}, capture="export")
    with pytest.raises(fxforge.InputShapeError):
        compiled(tokens=inputs["tokens"])  # compiled with a mask: calling without one is another program


def test_export_keeps_batch_and_sequence_dynamic_by_default():
    model, inputs = _two_inputs()
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs, capture="export")
    longer = {"tokens": torch.randn(3, 9, 8), "mask": torch.ones(3, 9)}
    assert rel_error(compiled(**longer)["hidden"], model(**longer)["hidden"]) <= 1e-5
    with pytest.raises(fxforge.InputShapeError, match="same dimension"):
        compiled(tokens=torch.randn(3, 9, 8), mask=torch.ones(3, 7))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def test_symbolic_shape_contract_batch_varies_other_dims_fixed():
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert compiled.report.input_shapes == ["x: (x.batch[0..], 3, 8, 8)"]
    bigger_batch = torch.randn(5, 3, 8, 8)
    assert rel_error(compiled(bigger_batch), model(bigger_batch)) <= 1e-5
    with pytest.raises(fxforge.InputShapeError, match="dimension 2, compiled for exactly 8"):
        compiled(torch.randn(2, 3, 16, 16))
    with pytest.raises(fxforge.InputShapeError, match="compiled for x"):
        compiled(torch.randn(2, 3, 8))


def test_symbolic_named_dynamic_dims():
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, dynamic={"x": {0: "b", 2: "h", 3: "w"}})
    other = torch.randn(3, 3, 16, 12)
    assert rel_error(compiled(other), model(other)) <= 1e-5
    static = fxforge.compile(model, "cpu", example_inputs=x, dynamic=False)
    with pytest.raises(fxforge.InputShapeError, match="dimension 0"):
        static(torch.randn(3, 3, 8, 8))


def test_export_compiles_a_size_1_example_dim_as_exactly_1():
    model, _ = _two_inputs()
    single = {"tokens": torch.randn(1, 5, 8), "mask": torch.ones(1, 5)}
    compiled = fxforge.compile(model, "cpu", example_inputs=single, capture="export")
    assert compiled.report.input_shapes[0].startswith("tokens: (1, ")
    with pytest.raises(fxforge.InputShapeError, match="compiled for exactly 1.*an example of size 2 or more there"):
        compiled(tokens=torch.randn(2, 5, 8), mask=torch.ones(2, 5))

"""The OpenVINO targets: fp32 against eager, int8 against the x86 reference graph of the same calibration, the
lowered graph, copies and saved files, the deploy formats, availability without the package, the report."""

from __future__ import annotations

import copy
import importlib.util
import pickle
import sys
from collections import Counter

import pytest
import torch
from quant_helpers import batches, sqnr, toy_model
from tiny_bert import tiny_bert
from torch import nn

import fxforge
from fxforge.backends import openvino
from fxforge.errors import BackendUnavailableError, ConfigError, ExportError
from fxforge.pipeline.targets import resolve_target
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import assert_unchanged, module_types, one_intra_op_thread, randomize_bn, state_snapshot

_threads = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")

X = batches(1, (2, 3, 8, 8), seed=7)[0]
CALIBRATION = batches(4, (2, 3, 8, 8))


class SmallConvNet(nn.Module):
    """conv-bn-relu, conv-bn, average pool, linear: BatchNorms to fold (given random statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def int8_pair() -> tuple[nn.Module, fxforge.CompiledModule, fxforge.CompiledModule]:
    """(model, openvino-int8 compile, x86 reference int8 graph), both calibrated on the same batches."""
    model = toy_model()
    compiled = fxforge.compile(model, "openvino-int8", example_inputs=X, calibration=CALIBRATION)
    reference = fxforge.compile(model, "x86", example_inputs=X, calibration=CALIBRATION, pipeline=openvino.INT8_RECIPE)
    return model, compiled, reference


@needs_openvino
@pytest.mark.parametrize("make", [SmallConvNet, toy_model], ids=["conv-bn", "residual"])
def test_fp32_matches_eager(make):
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    snapshot = state_snapshot(model)
    compiled = fxforge.compile(model, "openvino", example_inputs=X)
    assert module_types(compiled.graph_module) == ["OpenVinoModule"]
    assert "fold-bn" in compiled.pipeline
    module = compiled.graph_module.get_submodule(openvino.MODULE_NAME)
    held = module.compiled_model
    assert [tuple(i.get_partial_shape().to_shape()) for i in held.inputs] == [tuple(X.shape)]  # every dim fixed
    assert held.get_property("INFERENCE_NUM_THREADS") == torch.get_num_threads()
    assert str(held.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")  # not bf16
    with torch.inference_mode():
        torch.testing.assert_close(compiled(X), model(X), rtol=1e-4, atol=1e-5)
        assert module.dynamic_request is None  # the example's shapes ran the fixed-shape model
        other = torch.randn(5, 3, 8, 8)  # the batch dimension stays dynamic
        torch.testing.assert_close(compiled(other), model(other), rtol=1e-4, atol=1e-5)
        assert module.dynamic_request is not None
    assert_unchanged(model, snapshot)


@needs_openvino
def test_tiny_bert_dynamic_batch_and_sequence():
    model, inputs = tiny_bert()
    compiled = fxforge.compile(model, "openvino", example_inputs=inputs, dynamic=True)
    for batch, length in ((2, 8), (3, 5)):
        call = {"input_ids": torch.randint(0, 100, (batch, length)),
                "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        with torch.inference_mode():
            got, expected = compiled(**call), model(**call)
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)


@needs_openvino
def test_int8_matches_the_reference_graph_and_x86(int8_pair):
    model, compiled, reference = int8_pair
    x86 = fxforge.compile(model, "x86", example_inputs=X, calibration=CALIBRATION)
    with torch.inference_mode():
        against_reference = outputs_sqnr_db(reference(X), compiled(X))
        other = batches(1, tuple(X.shape), seed=11)[0]
        on_other = outputs_sqnr_db(reference(other), compiled(other))
    # OpenVINO's int8 kernels reproduce the reference's quantize / dequantize points (equal outputs here)
    assert against_reference >= 60.0 and on_other >= 60.0, (against_reference, on_other)  # false on NaN
    ours, x86_db = sqnr(model, compiled, X), sqnr(model, x86, X)
    assert ours >= x86_db - 1.0, (ours, x86_db)
    assert compiled.report.quantization.model_sqnr_db == pytest.approx(ours, abs=1e-3)
    note = " ".join(compiled.report.passes[-1].notes)
    assert "Convolution u8" in note or "Convolution i8" in note, note
    assert not compiled.report.warnings


class ConvSilu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(nn.functional.silu(self.conv1(x)))


@needs_openvino
def test_int8_quantizes_after_silu_not_between_conv_and_silu():
    """OpenVINO fuses conv + silu into one int8 kernel only without a quantize / dequantize pair between them."""
    import onnx

    torch.manual_seed(0)
    model = ConvSilu().eval()
    compiled = fxforge.compile(model, "openvino-int8", example_inputs=X, calibration=CALIBRATION)
    graph = onnx.load_from_string(compiled.graph_module.get_submodule(openvino.MODULE_NAME).onnx).graph
    consumers = {name: [n.op_type for n in graph.node if name in n.input] for n in graph.node for name in n.output}
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    assert "QuantizeLinear" not in consumers[first_conv.output[0]], consumers[first_conv.output[0]]
    assert {"Sigmoid", "Mul"} & set(consumers[first_conv.output[0]])
    assert sqnr(model, compiled, X) >= 38.0  # reaches 41 dB; false on NaN


@needs_openvino
def test_int8_leaves_the_user_model_alone():
    model = toy_model()
    snapshot = state_snapshot(model)
    fxforge.compile(model, "openvino-int8", example_inputs=X, calibration=CALIBRATION)
    assert_unchanged(model, snapshot)


@needs_openvino
def test_copies_pickles_and_saved_files_rebuild_from_the_onnx_bytes(int8_pair, tmp_path):
    _, compiled, _ = int8_pair
    with torch.inference_mode():
        expected = compiled(X)
    fxforge.save(compiled, tmp_path / "model.fxf")
    for other in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled)), fxforge.load(tmp_path / "model.fxf")):
        module = other.graph_module.get_submodule(openvino.MODULE_NAME)
        assert module.compiled_model is not compiled.graph_module.get_submodule(openvino.MODULE_NAME).compiled_model
        with torch.inference_mode():
            torch.testing.assert_close(other(X), expected, rtol=0, atol=0)


@needs_openvino
def test_export_writes_the_held_onnx_and_refuses_torch_formats(int8_pair, tmp_path):
    _, compiled, _ = int8_pair
    path = compiled.export(tmp_path / "model.onnx")
    assert path.read_bytes() == compiled.graph_module.get_submodule(openvino.MODULE_NAME).onnx
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.inference_mode():
        assert outputs_sqnr_db(compiled(X), torch.from_numpy(got)) >= 30.0
    for name in ("model.pt2", "model.aoti.pt2"):
        with pytest.raises(ExportError, match="compile for 'x86'"):
            compiled.export(tmp_path / name)
    with pytest.raises(ConfigError, match="opset"):
        compiled.export(tmp_path / "again.onnx", opset=17)


@needs_openvino
def test_other_quantization_modes_name_the_targets_that_have_them():
    with pytest.raises(ConfigError, match=r"quantization='dynamic'.*openvino-int8.*x86"):
        fxforge.compile(toy_model(), "openvino-int8", example_inputs=X, quantization="dynamic")


@needs_openvino
def test_quantized_layers_run_in_float_are_warned(monkeypatch, caplog):
    """OpenVINO decides per layer whether its int8 kernels take a QDQ pattern; one it leaves in fp32 is warned."""
    monkeypatch.setattr(openvino.OpenVinoModule, "executed_layers",
                        lambda self: Counter({("Convolution", "f32"): 2, ("FullyConnected", "u8"): 1}))
    with caplog.at_level("WARNING", logger="fxforge"):
        compiled = fxforge.compile(toy_model(), "openvino-int8", example_inputs=X, calibration=CALIBRATION)
    (warning,) = [w for w in compiled.report.warnings if "OpenVINO" in w]
    assert "2 of the 3 quantized conv / linear layers" in warning
    assert warning in caplog.text and f"WARNING: {warning}" in str(compiled.report)


@needs_openvino
def test_bf16_reports_its_sqnr():
    if openvino.bf16_unavailable_reason() is not None:
        pytest.skip(openvino.bf16_unavailable_reason())
    model = randomize_bn(SmallConvNet()).eval()
    compiled = fxforge.compile(model, "openvino-bf16", example_inputs=X)
    db = compiled.report.output_sqnr_db
    assert 40.0 <= db < 70.0, db  # bf16's rounding (8 mantissa bits) shows: OpenVINO did not run fp32


def test_unavailable_without_openvino_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    reason = openvino.unavailable_reason()
    assert reason is not None and "pip install 'fxforge[openvino]'" in reason
    assert "openvino" not in fxforge.targets() and "openvino-int8" not in fxforge.targets()
    with pytest.raises(BackendUnavailableError, match=r"fxforge\[openvino\]"):
        resolve_target("openvino-int8")


@needs_openvino
def test_torchscript_and_recalibration_are_refused(int8_pair):
    _, compiled, _ = int8_pair
    with pytest.raises(fxforge.UnsupportedOpError, match="no TorchScript form"):
        compiled.to_torchscript()
    with pytest.raises(fxforge.CalibrationError, match="compile again"):
        fxforge.recalibrate(compiled, CALIBRATION)

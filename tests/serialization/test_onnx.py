"""export_onnx: round trips through ONNX Runtime (and OpenVINO) in a fresh process that cannot import fxforge."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_helpers import batches, int8_where_it_holds, rnn_layers_timed_as
from tiny_bert import tiny_bert
from torch import nn

import fxforge
from fxforge.cli import main
from fxforge.errors import ExportError
from fxforge.graph.fused import FusedConv
from fxforge.numerics.metrics import max_errors
from fxforge.passes import quantize_dynamic
from fxforge.quant.sqnr import outputs_sqnr_db
from fxforge.serialization.onnx import METADATA, export_onnx
from fxforge.testing.speech import trained_speech_embedder
from helpers import one_intra_op_thread, reestimate_bn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = [t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()]
OPENVINO_FLOOR_DB = 30.0  # reached: 139 dB at batch 1, 33.1 dB at batch 2 (OpenVINO 2026.4)

# Runs an exported file on .npy inputs and writes the outputs, with fxforge unimportable: the file must
# stand alone. argv: runtime ("ort" / "openvino"), model, output folder, then one .npz per call.
_RUNNER = textwrap.dedent("""
    import sys
    sys.modules["fxforge"] = None  # any import of fxforge fails
    import numpy as np
    runtime, model, out = sys.argv[1:4]
    if runtime == "ort":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = out + "/optimized.onnx"
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        run = lambda feed: session.run(None, feed)
    else:
        import openvino
        compiled = openvino.Core().compile_model(model, "CPU")
        names = [i.get_any_name() for i in compiled.inputs]
        run = lambda feed: [compiled(feed)[o] for o in compiled.outputs]
    for k, path in enumerate(sys.argv[4:]):
        feed = dict(np.load(path))
        assert sorted(feed) == sorted(names), (sorted(feed), names)
        np.savez(f"{out}/out{k}.npz", *run(feed))
""")


def run_standalone(model: Path, calls: list[dict[str, torch.Tensor]], tmp: Path,
                   runtime: str = "ort") -> list[list[torch.Tensor]]:
    """The exported ``model``'s outputs for each call, computed in a fresh process without fxforge."""
    paths = []
    for k, feed in enumerate(calls):
        paths.append(tmp / f"in{k}.npz")
        np.savez(paths[-1], **{name: t.numpy() for name, t in feed.items()})
    done = subprocess.run([sys.executable, "-c", _RUNNER, runtime, str(model), str(tmp), *map(str, paths)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = []
    for k in range(len(calls)):
        with np.load(tmp / f"out{k}.npz") as loaded:
            outputs.append([torch.from_numpy(loaded[f"arr_{i}"]) for i in range(len(loaded.files))])
    return outputs


def rand(*shape: int) -> torch.Tensor:
    """Inputs drawn from a fixed seed per shape: the floors below hold for these draws."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


def op_counts(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def resnet18(size: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """torchvision's resnet18, random weights with BatchNorm re-estimated, and 4 batches of 4 x 3 x size x size."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, size, size, generator=generator) for _ in range(4)]
    return reestimate_bn(models.resnet18().eval(), data), data


@pytest.fixture(scope="module")
def resnet18_x86() -> fxforge.CompiledModule:
    # 128 x 128: at 64 x 64 this random-init network's int8 output is ~22 dB from fp32, and two int8 runtimes'
    # rounding differences (one step on a few elements per layer) grow to ~28 dB between them; a larger final
    # map averages them down
    model, data = resnet18(128)
    return fxforge.compile(model, "x86", example_inputs=(data[0],), calibration=data)


def test_resnet18_fp32_round_trip_at_two_batch_sizes(tmp_path: Path) -> None:
    model, data = resnet18(64)
    compiled = fxforge.compile(model, "cpu", example_inputs=(data[0],))
    path = export_onnx(compiled, tmp_path / "r18.onnx")
    calls = [rand(1, 3, 64, 64), rand(3, 3, 64, 64)]
    outputs = run_standalone(path, [{"x": x} for x in calls], tmp_path)
    for x, (got,) in zip(calls, outputs, strict=True):
        rel = max_errors(got, compiled(x))[1]
        assert rel <= 1e-5, rel  # reached: 4e-6; max_errors gives inf (never NaN) on non-finite values


def test_resnet18_x86_int8_runs_int8_kernels_in_ort(resnet18_x86: fxforge.CompiledModule, tmp_path: Path) -> None:
    path = export_onnx(resnet18_x86, tmp_path / "r18_int8.onnx")
    calls = [rand(1, 3, 128, 128), rand(3, 3, 128, 128)]
    outputs = run_standalone(path, [{"x": x} for x in calls], tmp_path)
    for x, (got,) in zip(calls, outputs, strict=True):
        db = outputs_sqnr_db(resnet18_x86(x), got)
        assert db >= 30.0, db  # reached: 30.8 / 31.4 dB (onnxruntime 1.32); fails on NaN
    graph = resnet18_x86.observed_graph
    convs = sum(isinstance(m, nn.Conv2d) for m in graph.modules())
    with_add = sum(isinstance(m, FusedConv) and m.add for m in graph.modules())
    optimized = op_counts(tmp_path / "optimized.onnx")
    # ORT runs each DQ -> Conv (-> Relu) -> Q as one QLinearConv; convs fused with their residual add (one
    # int8 kernel in fxforge, no int8 value between conv and add) stay fp32 convs in ORT (its FusedConv: + add)
    assert 0 < with_add < convs
    assert optimized["QLinearConv"] == convs - with_add, optimized
    assert optimized["Conv"] + optimized["FusedConv"] == with_add, optimized
    assert optimized["QGemm"] == 1, optimized


def test_openvino_runs_the_int8_file(resnet18_x86: fxforge.CompiledModule, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the [bench] extra)")
    path = export_onnx(resnet18_x86, tmp_path / "r18_int8.onnx")
    calls = [rand(1, 3, 128, 128), rand(2, 3, 128, 128)]
    outputs = run_standalone(path, [{"x": x} for x in calls], tmp_path, runtime="openvino")
    for x, (got,) in zip(calls, outputs, strict=True):
        db = outputs_sqnr_db(resnet18_x86(x), got)
        assert db >= OPENVINO_FLOOR_DB, db


class SmallNet(nn.Module):
    """conv-bn-relu, conv-relu, average pooling, flatten, linear: every op int8 in all three engines."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.pool, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(torch.relu(self.conv2(y))).flatten(1))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return reestimate_bn(SmallNet().eval(), batches(2, (4, 3, 16, 16)))


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    return next((onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name), None)


@pytest.mark.parametrize("target", INT8)
def test_qdq_file_holds_the_compiles_qparams_and_int8_weights(target: str, tmp_path: Path) -> None:
    compiled = fxforge.compile(small_net(), target, example_inputs=(batches(1, (4, 3, 16, 16))[0],),
                               calibration=batches(4, (4, 3, 16, 16)))
    path = export_onnx(compiled, tmp_path / "small.onnx")
    model = onnx.load(str(path))
    activation_scales = sorted(float(initializer(model, n.input[1])) for n in model.graph.node
                               if n.op_type == "QuantizeLinear")
    compiled_scales = sorted(float(b) for name, b in compiled.graph_module.named_buffers()
                             if name.startswith("act_") and name.endswith("_scale"))
    assert activation_scales and set(activation_scales) == set(compiled_scales)
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and getattr(initializer(model, n.input[0]), "dtype", None) == np.int8]
    assert len(weights) == 3  # conv1, conv2, fc: int8 initializers
    per_channel = [n for n in weights if initializer(model, n.input[1]).ndim == 1]
    assert {initializer(model, n.input[0]).shape[0] for n in per_channel} == {8, 16, 10}
    x = rand(2, 3, 16, 16)
    (got,), = run_standalone(path, [{"x": x}], tmp_path)
    assert outputs_sqnr_db(compiled(x), got) >= 40.0  # reached: equal on this draw, 41-50 dB on others
    optimized = op_counts(tmp_path / "optimized.onnx")
    assert optimized["QLinearConv"] == 2 and optimized["QGemm"] == 1, optimized  # every layer on int8 kernels


def test_recalibrated_scales_are_exported(tmp_path: Path) -> None:
    data = batches(4, (4, 3, 16, 16))
    compiled = fxforge.compile(small_net(), "x86", example_inputs=(data[0],), calibration=data)
    changes = fxforge.recalibrate(compiled, [x * 3 for x in data])
    model = onnx.load(str(export_onnx(compiled, tmp_path / "small.onnx")))
    scales = {float(initializer(model, n.input[1])) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert {new for _, new in changes.values()} <= scales
    assert not {old for old, new in changes.values() if old != new} & scales


def test_skipped_layer_stays_fp32(tmp_path: Path) -> None:
    data = batches(4, (4, 3, 16, 16))
    compiled = fxforge.compile(small_net(), "x86", example_inputs=(data[0],), calibration=data, skip="fc")
    path = export_onnx(compiled, tmp_path / "small.onnx")
    model = onnx.load(str(path))
    gemm = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul"))
    assert initializer(model, gemm.input[1]).dtype == np.float32  # the fp32 weight, no DequantizeLinear
    x = rand(2, 3, 16, 16)
    (got,), = run_standalone(path, [{"x": x}], tmp_path)
    assert outputs_sqnr_db(compiled(x), got) >= 45.0  # reached: 137 dB on this draw, 48.6 dB on another


def test_tiny_bert_fp32_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    model, inputs = tiny_bert()
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs)
    path = export_onnx(compiled, tmp_path / "bert.onnx")
    generator = torch.Generator().manual_seed(2)
    calls = [{"input_ids": torch.randint(0, 100, (b, t), generator=generator),
              "attention_mask": torch.ones(b, t, dtype=torch.long)} for b, t in ((2, 8), (3, 5))]
    for call, got in zip(calls, run_standalone(path, calls, tmp_path), strict=True):
        expected = compiled(**call)
        assert max_errors(got, [expected.last_hidden_state, expected.pooler_output])[1] <= 1e-6  # reached: 3e-7


@pytest.fixture(scope="module")
def speech() -> tuple[nn.Module, torch.Tensor]:
    return trained_speech_embedder(0)


@pytest.fixture(scope="module")
def speech_int8(speech: tuple[nn.Module, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[fxforge.CompiledModule, Path]:
    """The speech LSTM compiled with dynamic int8 (layer 0 fp32: int8 measures ~4 dB there; layers 1-2 int8) and
    exported to ONNX."""
    model, frames = speech
    with rnn_layers_timed_as(None):
        compiled = fxforge.compile(model, "x86", example_inputs=(frames[:8],), quantization="dynamic",
                                   pipeline=int8_where_it_holds())
    return compiled, compiled.export(tmp_path_factory.mktemp("speech") / "speech.onnx")


def embedding_agreement(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(SQNR dB, the minimum cosine per embedding) of ``got`` against ``expected``."""
    return outputs_sqnr_db(expected, got), torch.nn.functional.cosine_similarity(expected, got, dim=-1).min().item()


def test_dynamic_int8_speech_lstm_runs_in_ort_at_two_batch_sizes(speech, speech_int8, tmp_path: Path) -> None:
    (_, frames), (compiled, path) = speech, speech_int8
    schemes = compiled.report.quantization.layers[0].weight
    assert "l0 fp32" in schemes and "l1 int8" in schemes and "l2 int8" in schemes, schemes
    ops = op_counts(path)
    assert ops["DynamicQuantizeLSTM"] == 2 and ops["LSTM"] == 1 and ops["MatMulInteger"] == 1, ops
    model = onnx.load(str(path))
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 3]
    assert len(int8_weights) == 4  # W and R of each int8 layer: (directions, in, 4 * hidden)
    calls = [frames, frames[:3]]
    for x, (got,) in zip(calls, run_standalone(path, [{"frames": x} for x in calls], tmp_path), strict=True):
        with torch.inference_mode():
            db, cosine = embedding_agreement(compiled(x), got)
        assert db >= 50.0 and cosine >= 0.99999, (db, cosine)  # reached: 55 / 59 dB, 0.999994 (onnxruntime 1.23)
    assert "DynamicQuantizeMatMul" in op_counts(tmp_path / "optimized.onnx")  # ORT fuses the linear's chain


def test_openvino_runs_the_dynamic_int8_file(speech, speech_int8, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the [bench] extra)")
    (_, frames), (compiled, path) = speech, speech_int8
    (got,), = run_standalone(path, [{"frames": frames}], tmp_path, runtime="openvino")
    with torch.inference_mode():
        db, cosine = embedding_agreement(compiled(frames), got)
    assert db >= 48.0 and cosine >= 0.99998, (db, cosine)  # reached: 51.1 dB, 0.999988 (OpenVINO 2026.4)


def test_bf16_layers_run_in_fp32_and_the_file_says_so(speech, tmp_path: Path, capsys) -> None:
    model, frames = speech
    with rnn_layers_timed_as("bf16"):  # every layer takes bf16 where bf16 holds the floor
        compiled = fxforge.compile(model, "x86", example_inputs=(frames[:8],), quantization="dynamic")
    assert isinstance(compiled.graph_module.get_submodule("rnn.0"), quantize_dynamic.Bf16RNN)
    path = compiled.export(tmp_path / "bf16.onnx")
    notes = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA])["notes"]
    assert len(notes) == 1 and notes[0].startswith("rnn.0:") and "fp32" in notes[0], notes
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fxforge"]["quantization"] == "dynamic" and info["fxforge"]["notes"] == notes
    (got,), = run_standalone(path, [{"frames": frames}], tmp_path)
    with torch.inference_mode():
        db, cosine = embedding_agreement(compiled(frames), got)
    assert db >= 48.0 and cosine >= 0.99999, (db, cosine)  # reached: 52.8 dB (bf16 against fp32 arithmetic)


class Tagger(nn.Module):
    """A recurrent tagger: a linear on every step's output."""

    def __init__(self, rnn: type[nn.RNNBase] = nn.LSTM, **options: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = rnn(16, 32, batch_first=True, **options), nn.Linear(64 if options else 32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def test_bidirectional_int8_lstm_round_trips(tmp_path: Path) -> None:
    model = Tagger(num_layers=2, bidirectional=True).eval()
    compiled = fxforge.compile(model, "x86", example_inputs=(rand(2, 5, 16),), quantization="dynamic",
                               pipeline=int8_where_it_holds(min_layer_sqnr_db=-1000.0))
    path = export_onnx(compiled, tmp_path / "tagger.onnx")
    assert op_counts(path)["DynamicQuantizeLSTM"] == 2
    x = rand(3, 5, 16)  # another batch (the sequence length is fixed at the compiled one)
    (got,), = run_standalone(path, [{"x": x}], tmp_path)
    with torch.inference_mode():
        db = outputs_sqnr_db(compiled(x), got)
    assert db >= 45.0, db  # reached: 49 dB


def test_dynamic_int8_gru_is_a_typed_error(tmp_path: Path) -> None:
    compiled = fxforge.compile(Tagger(nn.GRU).eval(), "x86", example_inputs=(rand(2, 5, 16),),
                               quantization="dynamic", pipeline=int8_where_it_holds())
    with pytest.raises(ExportError, match="node 'rnn'.*no ONNX form.*skip the GRU") as info:
        export_onnx(compiled, tmp_path / "gru.onnx")
    assert info.value.node == "rnn" and info.value.op == "DynamicInt8RNN"
    assert not (tmp_path / "gru.onnx").exists()


@pytest.mark.parametrize("dynamic", [True, False])
def test_dynamic_keeps_the_batch_dimension_symbolic(dynamic: bool, tmp_path: Path) -> None:
    compiled = fxforge.compile(small_net(), "cpu", example_inputs=(rand(4, 3, 16, 16),))
    model = onnx.load(str(export_onnx(compiled, tmp_path / "small.onnx", dynamic=dynamic)))
    dims = [(d.dim_param or d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 16, 16]
    assert isinstance(dims[0], str) if dynamic else dims[0] == 4


class SqueezeExcite(nn.Module):
    """conv-hardswish, then mobilenet_v3's squeeze-excitation gate: mean, conv-relu, conv-hardsigmoid, mul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.hardswish(self.conv(x))
        gate = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(y * gate)


@pytest.fixture(scope="module")
def squeeze_excite_x86() -> tuple[nn.Module, fxforge.CompiledModule]:
    torch.manual_seed(0)
    model, data = SqueezeExcite().eval(), batches(4, (4, 3, 16, 16))
    return model, fxforge.compile(model, "x86", example_inputs=(data[0],), calibration=data)


def test_hardsigmoid_is_written_as_add_clip_div(squeeze_excite_x86, tmp_path: Path) -> None:
    model, compiled = squeeze_excite_x86
    int8 = op_counts(export_onnx(compiled, tmp_path / "se_int8.onnx"))
    assert int8["HardSigmoid"] == 0 and int8["Clip"] == int8["Div"] == 1, int8
    fp32 = op_counts(export_onnx(fxforge.compile(model, "cpu", example_inputs=(rand(2, 3, 16, 16),)),
                                 tmp_path / "se_fp32.onnx"))
    assert fp32["HardSigmoid"] == 0 and fp32["Clip"] == fp32["Div"] == 1, fp32
    x = rand(2, 3, 16, 16)
    (fp32_out,), = run_standalone(tmp_path / "se_fp32.onnx", [{"x": x}], tmp_path)
    torch.testing.assert_close(fp32_out, model(x), rtol=1e-4, atol=1e-5)
    (got,), = run_standalone(tmp_path / "se_int8.onnx", [{"x": x}], tmp_path)
    assert outputs_sqnr_db(compiled(x), got) >= 30.0  # fails on NaN


def test_openvino_fuses_the_int8_squeeze_excitation_gate(squeeze_excite_x86, tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (the [bench] extra)")
    model, compiled = squeeze_excite_x86
    path = export_onnx(compiled, tmp_path / "se_int8.onnx")
    x = rand(1, 3, 16, 16)
    (got,), = run_standalone(path, [{"x": x}], tmp_path, runtime="openvino")
    with torch.no_grad():
        reference = model(x)
    assert outputs_sqnr_db(compiled(x), got) >= OPENVINO_FLOOR_DB  # fails on NaN
    assert outputs_sqnr_db(reference, got) >= outputs_sqnr_db(reference, compiled(x)) - 1.0  # as accurate
    ov_model = ov.Core().read_model(str(path))
    ov_model.reshape([1, 3, 16, 16])
    request = ov.Core().compile_model(ov_model, "CPU", {"PERF_COUNT": True}).create_infer_request()
    request.infer({0: x.numpy()})
    executed = [(p.node_type, p.exec_type) for p in request.get_profiling_info() if p.status == p.Status.EXECUTED]
    # OpenVINO reads Add -> Clip -> Div as its HSigmoid and fuses it with the quantize-dequantize pairs around it;
    # ONNX's HardSigmoid would run as a float reference kernel of its own between them
    assert not [kind for kind in executed if kind[0] == "HardSigmoid" or kind[1].startswith("ref")], executed

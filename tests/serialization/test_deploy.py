"""compiled.export: torch.export programs (.pt2) that run in a process without fxforge, bit for bit; an
AOTInductor package; typed errors for what cannot be exported; the format table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from quant_helpers import int8_where_it_holds, rnn_layers_timed_as
from tiny_bert import tiny_bert
from torch import nn

import fxforge
from fxforge.cli import main
from fxforge.numerics.metrics import flat_tensors
from fxforge.pipeline.targets import all_targets
from fxforge.quant.sqnr import outputs_sqnr_db
from fxforge.serialization.deploy import FORMATS, format_for
from fxforge.testing.speech import trained_speech_embedder
from helpers import one_intra_op_thread, randomize_bn

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)

# Runs a saved program in a fresh process where importing fxforge fails: the file must not need it.
LOAD_PROGRAM = textwrap.dedent("""
    import sys
    sys.modules["fxforge"] = None  # any import of fxforge now raises ImportError
    import torch
    program, inputs, out = sys.argv[1:]
    module = torch.export.load(program).module()
    results = [module(*call) for call in torch.load(inputs)]
    torch.save(results, out)
""")

LOAD_PACKAGE = LOAD_PROGRAM.replace("torch.export.load(program).module()",
                                    "torch._inductor.aoti_load_package(program)")


class Block(nn.Module):
    """A residual block: the conv + add + relu that lowers onto oneDNN's fused-add (binary) op."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Block(16),
                          Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return randomize_bn(model).eval()


def run_fresh(script: str, artifact: Path, calls: list[tuple[torch.Tensor, ...]], tmp_path: Path) -> list:
    """The outputs of ``calls`` run on ``artifact`` by ``script`` in a new Python process."""
    inputs, out = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(calls, inputs)
    done = subprocess.run([sys.executable, "-c", script, str(artifact), str(inputs), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def compiled_outputs(compiled: nn.Module, calls: list[tuple[torch.Tensor, ...]]) -> list:
    with torch.inference_mode():
        return [compiled.graph_module(*call) for call in calls]


def flat(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def test_cnn_program_runs_without_fxforge_bit_identical_with_dynamic_batch(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    compiled = fxforge.compile(small_resnet(), "cpu", example_inputs=(x,))
    path = compiled.export(tmp_path / "cnn.pt2", example_inputs=(x,))
    bigger = torch.randn(5, 3, 32, 32)
    got = run_fresh(LOAD_PROGRAM, path, [(x,), (bigger,)], tmp_path)
    expected = compiled_outputs(compiled, [(x,), (bigger,)])
    assert torch.equal(got[0], expected[0])
    assert got[1].shape == (5, 10)
    torch.testing.assert_close(got[1], expected[1])  # another batch: same ops, oneDNN may pick another kernel
    with torch.inference_mode():
        assert torch.equal(compiled(x), expected[0])  # the compiled model still runs its prepacked weights


def test_tiny_bert_program_runs_without_fxforge_bit_identical(tmp_path):
    model, inputs = tiny_bert()
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs)
    path = compiled.export(tmp_path / "bert.pt2", example_inputs=inputs)
    call = (inputs["input_ids"], inputs["attention_mask"])
    longer = (torch.randint(0, 100, (3, 12)), torch.ones(3, 12, dtype=torch.long))
    got = run_fresh(LOAD_PROGRAM, path, [call, longer], tmp_path)
    expected = compiled_outputs(compiled, [call, longer])
    assert all(torch.equal(a, b) for a, b in zip(flat(got[0]), flat(expected[0]), strict=True))
    assert flat(got[1])[0].shape == (3, 12, 32)  # batch and sequence stay dynamic
    for a, b in zip(flat(got[1]), flat(expected[1]), strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_program_is_bit_identical(tmp_path):
    if all_targets()["cpu-bf16"].availability():
        pytest.skip("cpu-bf16 is not usable on this machine")
    x = torch.randn(2, 3, 32, 32)
    compiled = fxforge.compile(small_resnet(), "cpu-bf16", example_inputs=(x,))
    program = torch.export.load(compiled.export(tmp_path / "bf16.pt2"))
    with torch.inference_mode():
        expected = compiled(x)
    assert expected.dtype == torch.float32 and torch.equal(program.module()(x), expected)


def test_static_shapes_fix_the_batch(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    compiled = fxforge.compile(small_resnet(), "cpu", example_inputs=(x,))
    module = torch.export.load(compiled.export(tmp_path / "static.pt2", dynamic=False)).module()
    assert module(x).shape == (2, 10)
    with pytest.raises(Exception, match=r"size\(\)\[0\] == 2"):
        module(torch.randn(3, 3, 32, 32))


def test_weight_only_int8_exports_as_plain_tensors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    x = torch.randn(4, 64)
    compiled = fxforge.compile(model, "x86", example_inputs=(x,), quantization="weight-only")
    program = torch.export.load(compiled.export(tmp_path / "wo.pt2"))
    assert any(t.dtype == torch.int8 for t in program.state_dict.values())  # the weights stay int8 (either kernel)
    with torch.inference_mode():
        assert torch.equal(program.module()(x), compiled(x))


def test_static_int8_refuses_with_what_to_do(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    compiled = fxforge.compile(small_resnet(), "x86", example_inputs=(x,), calibration=[torch.randn(2, 3, 32, 32)])
    with pytest.raises(fxforge.ExportError, match=r"node '\w+'") as refused:
        compiled.export(tmp_path / "int8.pt2")
    assert re.search(r"Static int8 deploys as ONNX.*\.onnx", str(refused.value))
    assert not (tmp_path / "int8.pt2").exists()


@pytest.fixture(scope="module")
def speech_int8() -> tuple[nn.Module, torch.Tensor]:
    """The speech LSTM with dynamic int8: layer 0 fp32 (int8 measures ~4 dB there), layers 1-2 and the linear int8.
    Its first 10 frames: a program unrolls the int8 layers' steps, and exporting 20 took twice as long."""
    model, frames = trained_speech_embedder(0)
    frames = frames[:, :10]
    with rnn_layers_timed_as(None):
        compiled = fxforge.compile(model, "x86", example_inputs=(frames[:8],), quantization="dynamic",
                                   pipeline=int8_where_it_holds())
    return compiled, frames


def test_dynamic_int8_speech_lstm_program_runs_without_fxforge_bit_identical(speech_int8, tmp_path):
    compiled, frames = speech_int8
    assert "l1 int8" in compiled.report.quantization.layers[0].weight
    path = compiled.export(tmp_path / "speech.pt2")
    calls = [(frames,), (frames[:3],)]  # the batch stays dynamic; the sequence length is the compiled one
    for got, expected in zip(run_fresh(LOAD_PROGRAM, path, calls, tmp_path), compiled_outputs(compiled, calls),
                             strict=True):
        assert torch.equal(got, expected)
    ops = {str(n.target) for n in torch.export.load(path).graph.nodes if n.op == "call_function"}
    assert "aten._int_mm.default" in ops and not any("quantized" in op for op in ops), ops


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_bidirectional_dynamic_int8_rnn_programs_are_bit_identical(rnn, tmp_path):
    torch.manual_seed(0)  # 3 steps: a program unrolls each int8 layer's steps, and exporting them is slow
    model = nn.Sequential(nn.Linear(16, 16), rnn(16, 24, 2, batch_first=True, bidirectional=True)).eval()
    compiled = fxforge.compile(model, "x86", example_inputs=(torch.randn(2, 3, 16),), quantization="dynamic",
                               pipeline=int8_where_it_holds(min_layer_sqnr_db=-1000.0))
    program = torch.export.load(compiled.export(tmp_path / "rnn.pt2")).module()
    x = torch.randn(5, 3, 16)
    with torch.inference_mode():
        expected = compiled(x)
    got = program(x)
    assert all(torch.equal(a, b) for a, b in zip(flat_tensors(got), flat_tensors(expected), strict=True))


@pytest.mark.skipif("qnnpack" not in fxforge.targets(), reason="no qnnpack engine in this torch build")
def test_qnnpack_dynamic_int8_program_agrees_within_float_rounding(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LSTM(16, 24, 2, batch_first=True)).eval()
    compiled = fxforge.compile(model, "qnnpack", example_inputs=(torch.randn(2, 6, 16),), quantization="dynamic",
                               pipeline=int8_where_it_holds("qnnpack", min_layer_sqnr_db=-1000.0))
    program = torch.export.load(compiled.export(tmp_path / "qnnpack.pt2")).module()
    x = torch.randn(5, 6, 16)
    with torch.inference_mode():
        db = outputs_sqnr_db(compiled(x), program(x))
    assert db >= 100.0, db  # reached: 144 dB (qnnpack rounds a few values otherwise: not bit for bit)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(16, 24, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def test_dynamic_int8_rnn_with_a_dynamic_sequence_length_is_a_typed_error(tmp_path):
    compiled = fxforge.compile(Encoder().eval(), "x86", example_inputs=(torch.randn(2, 6, 16),),
                               quantization="dynamic", pipeline=int8_where_it_holds(),
                               dynamic={"x": {0: "batch", 1: "seq"}})
    with pytest.raises(fxforge.ExportError, match="sequence length cannot stay dynamic: export with dynamic=False"):
        compiled.export(tmp_path / "seq.pt2")
    assert not (tmp_path / "seq.pt2").exists()
    program = torch.export.load(compiled.export(tmp_path / "fixed.pt2", dynamic=False)).module()
    x = torch.randn(2, 6, 16)
    with torch.inference_mode():
        assert torch.equal(program(x), compiled(x))


def test_format_from_name_or_argument():
    assert format_for(Path("m.pt2"), None).name == "pt2"
    assert format_for(Path("m.aoti.pt2"), None).name == "aoti"
    assert format_for(Path("M.ONNX"), None).name == "onnx"
    assert format_for(Path("m.pt2"), "aoti").name == "aoti"
    assert set(FORMATS) == {"pt2", "aoti", "onnx"}


def test_unknown_formats_are_config_errors(tmp_path):
    compiled = fxforge.compile(small_resnet(), "cpu", example_inputs=(torch.randn(2, 3, 32, 32),))
    with pytest.raises(fxforge.ConfigError, match="Did you mean 'onnx'"):
        compiled.export(tmp_path / "m.bin", format="onx")
    with pytest.raises(fxforge.ConfigError, match=r"\.pt2.*\.onnx"):
        compiled.export(tmp_path / "m.bin")


def test_onnx_without_its_exporter_package_is_a_typed_error(tmp_path, monkeypatch):
    compiled = fxforge.compile(small_resnet(), "cpu", example_inputs=(torch.randn(2, 3, 32, 32),))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the [export] extra were not installed
    with pytest.raises(fxforge.ExportError, match=r"needs onnxscript: pip install .fxforge\[export\]"):
        compiled.export(tmp_path / "m.onnx")


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())).eval()


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory) -> tuple[Path, nn.Module]:
    """An AOTInductor package of a few convs (compiling it takes tens of seconds on two cores)."""
    compiled = fxforge.compile(tiny_cnn(), "cpu", example_inputs=(torch.randn(2, 3, 16, 16),))
    path = compiled.export(tmp_path_factory.mktemp("aoti") / "tiny.aoti.pt2")
    return path, compiled


def test_aoti_package_runs_in_a_fresh_process(aoti_package, tmp_path):
    path, compiled = aoti_package
    calls = [(torch.randn(2, 3, 16, 16),), (torch.randn(4, 3, 16, 16),)]
    got = run_fresh(LOAD_PACKAGE, path, calls, tmp_path)
    for out, expected in zip(got, compiled_outputs(compiled, calls), strict=True):
        torch.testing.assert_close(flat(out)[0], expected)  # inductor reorders float sums: close, not equal


def test_info_describes_an_aoti_package(aoti_package, capsys):
    path, _ = aoti_package
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "aoti" and info["fxforge"]["target"] == "cpu" and info["libraries"] >= 1
    assert info["cpu_isa"]  # the ISA the package's code was compiled for


def test_a_registered_deploy_writer_writes_its_backends_models_only(tmp_path, monkeypatch):
    """A backend holding its model in another runtime's form writes it itself; other models take the table."""
    from fxforge.serialization import deploy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    compiled = fxforge.compile(model, "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    calls = []

    def writer(candidate, format, path, options):
        calls.append((format, options))
        if not getattr(candidate, "held", False):
            return None  # not this backend's model
        path.write_bytes(b"held")
        return path

    monkeypatch.setattr(deploy, "_WRITERS", [])
    deploy.register_deploy_writer(writer)
    deploy.register_deploy_writer(writer)  # once only
    written = compiled.export(tmp_path / "plain.pt2")
    assert torch.export.load(written) is not None and calls == [("pt2", {})]
    compiled.__dict__["held"] = True
    assert compiled.export(tmp_path / "held.onnx", opset=18).read_bytes() == b"held"
    assert calls[-1] == ("onnx", {"opset": 18})


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def test_dynamic_int8_aoti_package_runs_in_a_fresh_process(tmp_path):
    # a short sequence: the package unrolls the int8 LSTM's steps, and compiling them takes about a minute
    compiled = fxforge.compile(Tagger().eval(), "x86", example_inputs=(torch.randn(2, 3, 8),),
                               quantization="dynamic", pipeline=int8_where_it_holds())
    path = compiled.export(tmp_path / "tagger.aoti.pt2")
    calls = [(torch.randn(2, 3, 8),), (torch.randn(5, 3, 8),)]
    for got, expected in zip(run_fresh(LOAD_PACKAGE, path, calls, tmp_path), compiled_outputs(compiled, calls),
                             strict=True):
        torch.testing.assert_close(got, expected)  # inductor may fuse the float epilogue otherwise: close

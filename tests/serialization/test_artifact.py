"""fxforge.save / fxforge.load / CompiledModule.to_torchscript: round trips for every target usable here."""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from quant_helpers import batches, toy_model
from torch import fx, nn

import fxforge
from fxforge.quant.qspec import quantized_engine
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = [t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.lstm, self.head = nn.Linear(8, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 4)
        self.gru = nn.GRU(4, 6, num_layers=2, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.lstm(torch.relu(self.fc(x)))[0])
        return self.gru(y.transpose(0, 1))[0]


def recurrent() -> nn.Module:
    torch.manual_seed(0)
    return Recurrent().eval()


def cases() -> list[tuple[str, str, dict]]:
    """(target, quantization mode, compile kwargs) for every target and mode usable on this machine."""
    out = [("cpu", "fp32", {})] if "cpu" in fxforge.targets() else []
    for target in INT8:
        out += [(target, "static", {"calibration": batches(4)}), (target, "dynamic", {"quantization": "dynamic"}),
                (target, "weight-only", {"quantization": "weight-only"})]
    return out


def compiled_case(target: str, mode: str, kwargs: dict) -> tuple[fxforge.CompiledModule, torch.Tensor]:
    if mode in ("fp32", "static"):
        model, x = toy_model(), batches(1, seed=3)[0]
    else:
        model, x = recurrent(), torch.randn(2, 5, 8)
    return fxforge.compile(model, target, example_inputs=x, **kwargs), x


def outputs(module: nn.Module, x: torch.Tensor, engine: str | None = None) -> torch.Tensor:
    with quantized_engine(engine), torch.inference_mode():
        return module(x)


@pytest.mark.parametrize(("target", "mode", "kwargs"), cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_save_load_gives_identical_outputs(tmp_path, target, mode, kwargs):
    compiled, x = compiled_case(target, mode, kwargs)
    expected = outputs(compiled, x)
    path = fxforge.save(compiled, tmp_path / "model.fxf")
    loaded = fxforge.load(path)
    assert isinstance(loaded, fxforge.CompiledModule)
    assert torch.equal(outputs(loaded, x), expected)
    assert torch.equal(outputs(loaded, x * 0.5), outputs(compiled, x * 0.5))  # not only the example input
    assert (loaded.target, loaded.pipeline, str(loaded.report)) == (compiled.target, compiled.pipeline,
                                                                      str(compiled.report))


@pytest.mark.parametrize(("target", "mode", "kwargs"), cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_metadata_describes_the_model(tmp_path, target, mode, kwargs):
    compiled, x = compiled_case(target, mode, kwargs)
    meta = fxforge.read_metadata(fxforge.save(compiled, tmp_path / "model.fxf"))
    assert (meta["target"], meta["pipeline"], meta["torch_version"]) == (target, compiled.pipeline, torch.__version__)
    assert meta["inputs"] == [{"name": "x", "shape": list(x.shape),
                               "dtype": "float32"}]
    if mode == "fp32":
        assert meta["quantization"] is None and meta["engine"] == "onednn"
        return
    # the engine the graph runs under: the target's, except static x86 whose conv+add kernels need onednn
    expected = "onednn" if (target, mode) == ("x86", "static") else target
    assert meta["engine"] == expected == compiled.quant_options.runtime_engine
    assert meta["quantization"]["mode"] == mode
    layers = compiled.report.quantization.layers
    assert [q["layer"] for q in meta["quantization"]["qparams"]] == [r.layer for r in layers]
    assert [q["scale"] for q in meta["quantization"]["qparams"]] == [r.scale for r in layers]


def test_the_archive_holds_a_readable_report(tmp_path):
    compiled, _ = compiled_case("cpu", "fp32", {})
    with zipfile.ZipFile(fxforge.save(compiled, tmp_path / "m.fxf")) as archive:
        assert archive.read("report.txt").decode().strip() == str(compiled.report)
        assert json.loads(archive.read("report.json"))["pipeline"] == compiled.pipeline


def test_loading_keeps_node_metadata_without_tracing(tmp_path, monkeypatch):
    compiled, x = compiled_case(INT8[0], "static", {"calibration": batches(4)}) if INT8 else pytest.skip("no int8")

    def no_tracing(*args, **kwargs):
        raise AssertionError("load traced")

    path = fxforge.save(compiled, tmp_path / "m.fxf")
    monkeypatch.setattr(fx.Tracer, "trace", no_tracing)
    loaded = fxforge.load(path)
    origins = {n.name: n.meta.get("fxforge", {}).get("origins") for n in compiled.graph_module.graph.nodes}
    assert {n.name: n.meta.get("fxforge", {}).get("origins") for n in loaded.graph_module.graph.nodes} == origins
    assert any(origins.values())


@pytest.mark.parametrize(("target", "mode", "kwargs"), cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_torchscript_round_trip(target, mode, kwargs):
    compiled, x = compiled_case(target, mode, kwargs)
    engine = compiled.quant_options.runtime_engine if compiled.quant_options else None
    buffer = io.BytesIO()
    torch.jit.save(compiled.to_torchscript(x), buffer)
    with quantized_engine(engine):  # packed weights are re-packed for the engine current while loading
        scripted = torch.jit.load(io.BytesIO(buffer.getvalue()))
    assert torch.equal(outputs(scripted, x, engine), outputs(compiled, x))
    assert torch.equal(outputs(scripted, x + 1, engine), outputs(compiled, x + 1))


USER_CODE = '''
import torch
from torch import nn


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, torch.export rejects it, TorchScript scripts it."""

    def forward(self, x):
        if x.mean() > 0:
            return x * 2
        return x - 1


class Rows(nn.Module):
    """A Python loop over a shape: torch.fx cannot trace it, torch.export specializes it."""

    def forward(self, x):
        return torch.stack([x[:, i] * (i + 1) for i in range(x.shape[1])], 1)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Gate()
        self.rows, self.fc = Rows(), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = self.rows(self.gate(torch.relu(self.bn(self.conv(x)))))
        return self.fc(torch.flatten(y, 1))
'''

LOADER = '''
import sys, importlib.util, torch, fxforge
try:
    fxforge.load(sys.argv[1])
    raise AssertionError("torch.export / TorchScript programs loaded without trusted=True")
except fxforge.ArtifactError as exc:
    assert "trusted=True" in str(exc), exc
model = fxforge.load(sys.argv[1], trusted=True)
x, expected = torch.load(sys.argv[2])
assert importlib.util.find_spec("usermodel_fxf") is None, "the user's module is importable: the test proves nothing"
assert torch.equal(model(x), expected), "outputs differ after loading"
assert not [m for m in sys.modules if m.startswith("usermodel")]
print("loaded", fxforge.read_metadata(sys.argv[1])["portable_submodules"])
'''


@pytest.mark.parametrize("target", ["cpu", *INT8[:1]])
def test_load_in_a_fresh_process_without_the_user_class(tmp_path, monkeypatch, target):
    src = tmp_path / "src"
    src.mkdir()
    (src / "usermodel_fxf.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(src))
    import usermodel_fxf

    torch.manual_seed(0)
    model = usermodel_fxf.UserNet().eval()
    x = torch.randn(2, 3, 8, 8)
    kwargs = {"calibration": [torch.randn(2, 3, 8, 8) for _ in range(4)]} if target != "cpu" else {}
    compiled = fxforge.compile(model, target, example_inputs=x, **kwargs)
    assert set(compiled.report.leaf_modules) == {"gate", "rows"}
    fxforge.save(compiled, tmp_path / "m.fxf")
    torch.save((x, outputs(compiled, x)), tmp_path / "io.pt")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "m.fxf"), str(tmp_path / "io.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'gate': 'torchscript'" in done.stdout and "'rows': 'export'" in done.stdout


def _rewrite_metadata(path, **changes) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    meta = json.loads(members["fxforge.json"])
    meta.update(changes)
    members["fxforge.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.fixture
def saved(tmp_path):
    compiled, x = compiled_case("cpu", "fp32", {})
    return fxforge.save(compiled, tmp_path / "m.fxf"), compiled, x


def test_incompatible_torch_version_fails_with_what_to_do(saved):
    path, compiled, x = saved
    _rewrite_metadata(path, torch_version="1.13.1")
    with pytest.raises(fxforge.ArtifactError, match=r"saved with torch 1\.13\.1.*compile the original model again"):
        fxforge.load(path)
    assert torch.equal(outputs(fxforge.load(path, check_version=False), x), outputs(compiled, x))


def test_missing_engine_fails_with_what_to_do(tmp_path, monkeypatch):
    if not INT8:
        pytest.skip("no int8 engine here")
    compiled, _ = compiled_case(INT8[0], "static", {"calibration": batches(4)})
    path = fxforge.save(compiled, tmp_path / "m.fxf")
    registry = importlib.import_module("fxforge.pipeline.targets")  # the module (fxforge.targets is the function)

    gone = dataclasses.replace(registry.all_targets()[INT8[0]], availability=lambda: "this torch build has no engine")
    monkeypatch.setitem(registry._TARGETS, INT8[0], gone)
    with pytest.raises(fxforge.BackendUnavailableError, match=f"compiled for target '{INT8[0]}'.*usable here"):
        fxforge.load(path)


def test_newer_format_and_foreign_files_fail_clearly(saved, tmp_path):
    path, _, _ = saved
    _rewrite_metadata(path, format_version=99)
    with pytest.raises(fxforge.ArtifactError, match="upgrade fxforge"):
        fxforge.load(path)
    (tmp_path / "other.pt").write_bytes(b"not a zip")
    with pytest.raises(fxforge.ArtifactError, match="not a model written by fxforge.save"):
        fxforge.load(tmp_path / "other.pt")
    with pytest.raises(fxforge.ArtifactError, match="takes the module fxforge.compile returned"):
        fxforge.save(nn.Linear(2, 2), tmp_path / "x.fxf")


@fx.wrap
def user_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 3


class CallsUserFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return user_scale(x) + 1


def test_a_graph_calling_user_code_is_refused_at_save(tmp_path):
    compiled = fxforge.compile(CallsUserFunction().eval(), "cpu", example_inputs=torch.randn(2, 3))
    with pytest.raises(fxforge.ArtifactError, match="user_scale"):
        fxforge.save(compiled, tmp_path / "m.fxf")
    assert not (tmp_path / "m.fxf").exists()


class Indexes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)[:, 1:3, ...] * x[..., ::2, :].sum()


def test_a_graph_indexing_with_slices_and_ellipsis_round_trips(tmp_path):
    x = torch.randn(2, 4, 8)
    compiled = fxforge.compile(Indexes().eval(), "cpu", example_inputs=x)
    fxforge.save(compiled, tmp_path / "m.fxf")
    assert torch.equal(fxforge.load(tmp_path / "m.fxf")(x), compiled(x))


@pytest.mark.skipif(not INT8, reason="no int8 engine here")
def test_a_recalibratable_file_can_be_recalibrated_after_loading(tmp_path):
    compiled, x = compiled_case(INT8[0], "static", {"calibration": batches(4, scale=0.2)})
    plain = fxforge.load(fxforge.save(compiled, tmp_path / "plain.fxf"))
    with pytest.raises(fxforge.CalibrationError, match="recalibratable=True"):
        fxforge.recalibrate(plain, batches(4, scale=3.0))
    path = fxforge.save(compiled, tmp_path / "full.fxf", recalibratable=True)
    assert fxforge.read_metadata(path)["recalibratable"]
    loaded = fxforge.load(path)
    drifted = batches(4, scale=3.0, seed=9)
    assert fxforge.recalibrate(loaded, drifted) == fxforge.recalibrate(compiled, drifted)
    assert torch.equal(outputs(loaded, drifted[0]), outputs(compiled, drifted[0]))
    with pytest.raises(fxforge.ArtifactError, match="has none"):
        fxforge.save(compiled_case("cpu", "fp32", {})[0], tmp_path / "x.fxf", recalibratable=True)

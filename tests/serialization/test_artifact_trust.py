"""fxforge.load on files it did not write as saved: no code runs, damage is named, save is atomic, per-layer
engines survive, and a model whose kernels need VNNI is refused where int8 sums would saturate."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from quant_helpers import batches, toy_model

import fxforge
from fxforge.backends import int8_lowering
from fxforge.backends.cuda_graphs import CudaRuntime, wrap_in_runtime
from fxforge.backends.int8_packed import PackedWeight
from fxforge.quant import qspec
from fxforge.quant.qspec import quantized_engine
from fxforge.serialization.codec import FnRef, stored_globals
from fxforge.serialization.torchscript import load_torchscript, save_torchscript, torchscript_metadata
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
X = batches(1, seed=3)[0]


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rewrite(path: Path, replaced: dict[str, bytes], dropped: tuple[str, ...] = (), meta: dict | None = None,
            fix_checksums: bool = True) -> None:
    """The archive at ``path`` with some members replaced or dropped; checksums recomputed as an attacker would."""
    content = {**members(path), **replaced}
    metadata = json.loads(content["fxforge.json"])
    metadata.update(meta or {})
    if fix_checksums and "members" in metadata:
        metadata["members"] = {name: hashlib.sha256(content[name]).hexdigest() for name in metadata["members"]}
    content["fxforge.json"] = json.dumps(metadata).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in content.items():
            if name not in dropped:
                archive.writestr(name, data)


@pytest.fixture(scope="module")
def fp32_model() -> fxforge.CompiledModule:
    return fxforge.compile(toy_model(), "cpu", example_inputs=X)


@pytest.fixture
def saved(tmp_path, fp32_model) -> Path:
    return fxforge.save(fp32_model, tmp_path / "m.fxf")


class WritesAFile:
    """A pickle that, when unpickled with code execution allowed, writes ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('pwned')",)


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("encoding", ["torch.save", "pickle"])
def test_a_malicious_pickle_is_refused_and_runs_nothing(saved, tmp_path, encoding):
    marker = tmp_path / "pwned"
    evil = WritesAFile(marker)
    payload = torch_saved({"records": evil}) if encoding == "torch.save" else pickle.dumps(evil)
    rewrite(saved, {"model.pt": payload})
    with pytest.raises(fxforge.ArtifactError, match="model.pt holds something other than tensors"):
        fxforge.load(saved)
    assert not marker.exists()
    with pytest.raises(fxforge.ArtifactError, match="model.pt holds something other than tensors"):
        fxforge.load(saved, trusted=True)  # opens torch.export / TorchScript programs, never a pickle
    assert not marker.exists()


def stored_state(path: Path) -> dict:
    """The payload of a file this test wrote itself (so unpickling it with code allowed is safe)."""
    return torch.load(io.BytesIO(members(path)["model.pt"]), weights_only=False)


@pytest.mark.parametrize(("op", "target", "args", "refused"), [
    ("call_function", FnRef("os:system"), ("true",), "os:system"),
    ("call_function", FnRef("fxforge.serialization.codec:io.open"), ("x",), "io.open"),
    ("call_function", FnRef("fxforge.artifact:save"), ("x", "y"), "fxforge.artifact:save"),
    ("call_method", "__reduce_ex__", (), "not a public torch.Tensor method"),
    ("call_function", FnRef("builtins:getattr"), ("x", "__class__"), "getattr"),
])
def test_a_graph_calling_anything_but_tensor_ops_is_refused(saved, op, target, args, refused):
    state = stored_state(saved)
    record = state["records"][1]
    state["records"][1] = type(record)(record.name, op, target, args, {}, {})
    rewrite(saved, {"model.pt": torch_saved(state)})
    with pytest.raises(fxforge.ArtifactError, match=refused):
        fxforge.load(saved)


def test_the_stored_graph_names_its_functions_and_loads_them_back(saved, fp32_model):
    targets = {r.target for r in stored_state(saved)["records"] if r.op == "call_function"}
    assert FnRef("torch:flatten") in targets and all(isinstance(t, FnRef) for t in targets)
    with torch.inference_mode():
        assert torch.equal(fxforge.load(saved)(X), fp32_model(X))


def flip_a_byte_of(path: Path, member: str) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # after the local header
    data[start + info.compress_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_named(saved):
    flip_a_byte_of(saved, "model.pt")
    with pytest.raises(fxforge.ArtifactError, match="damaged.*(CRC|BadZipFile)"):
        fxforge.load(saved)


def test_a_truncated_file_is_named(saved):
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(fxforge.ArtifactError, match="damaged"):
        fxforge.load(saved)


def test_a_missing_member_is_named(saved):
    rewrite(saved, {}, dropped=("report.json",))
    with pytest.raises(fxforge.ArtifactError, match="member 'report.json' is missing"):
        fxforge.load(saved)


@pytest.mark.parametrize("key", ["target", "members", "isa"])
def test_a_missing_metadata_key_is_named(saved, key):
    content = members(saved)
    meta = json.loads(content["fxforge.json"])
    meta.pop(key, None)
    with zipfile.ZipFile(saved, "w") as archive:
        for name, data in {**content, "fxforge.json": json.dumps(meta).encode()}.items():
            archive.writestr(name, data)
    with pytest.raises(fxforge.ArtifactError, match=f"lacks '{key}'"):
        fxforge.load(saved)


def test_a_member_changed_after_saving_fails_its_checksum(saved):
    rewrite(saved, {"report.txt": b"all layers int8, 0 dB lost\n"}, fix_checksums=False)
    with pytest.raises(fxforge.ArtifactError, match="member report.txt does not match the checksum"):
        fxforge.load(saved)


def test_a_failed_save_leaves_the_previous_file(saved, fp32_model, monkeypatch):
    before = saved.read_bytes()
    write = zipfile.ZipFile.writestr

    def disk_full(self, name, data, *args, **kwargs):
        if str(getattr(name, "filename", name)) == "model.pt":
            write(self, name, data[: len(data) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return write(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fxforge.save(fp32_model, saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m.fxf"]  # no temporary file left behind
    with torch.inference_mode():
        assert torch.equal(fxforge.load(saved)(X), fp32_model(X))


def packed_engines(module: torch.nn.Module) -> dict[str, str]:
    return {name: m.engine for name, m in module.named_modules() if isinstance(m, PackedWeight)}


@pytest.mark.skipif("x86" not in fxforge.targets(), reason="no x86 int8 engine here")
def test_each_layers_engine_survives_the_round_trip(tmp_path, monkeypatch):
    turns = itertools.count()

    def alternate(kernel, prepack, engines, x, scale, zero_point):  # force a mix instead of timing
        engine = engines[next(turns) % len(engines)]
        return engine, prepack(engine)

    monkeypatch.setattr(int8_lowering, "fastest_prepacked", alternate)
    compiled = fxforge.compile(toy_model(), "x86", example_inputs=X, calibration=batches(4))
    engines = packed_engines(compiled.graph_module)
    assert len(set(engines.values())) > 1, engines
    loaded = fxforge.load(fxforge.save(compiled, tmp_path / "m.fxf"))
    assert packed_engines(loaded.graph_module) == engines
    for x in (X, X * 3):
        with torch.inference_mode():
            assert torch.equal(loaded(x), compiled(x))


@pytest.mark.skipif("x86" not in fxforge.targets(), reason="no x86 int8 engine here")
def test_a_model_built_for_vnni_is_refused_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: True)  # compiled as on a VNNI CPU: 8-bit weights
    compiled = fxforge.compile(toy_model(), "x86", example_inputs=X, calibration=batches(4))
    path = fxforge.save(compiled, tmp_path / "m.fxf")
    isa = fxforge.read_metadata(path)["isa"]
    assert isa["requires_vnni"] and isa["reduce_range"] is False and isa["engine"] == "onednn"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN limited below VNNI
    with pytest.raises(fxforge.BackendUnavailableError, match="ONEDNN_MAX_CPU_ISA=AVX2.*Compile the original"):
        fxforge.load(path)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)  # a CPU without VNNI
    with pytest.raises(fxforge.BackendUnavailableError, match="saturate here without VNNI"):
        fxforge.load(path)


@pytest.mark.parametrize(("target", "kwargs"), [("qnnpack", {"calibration": batches(4)}),
                                                ("x86", {"quantization": "weight-only"})])
def test_models_that_do_not_need_vnni_load_without_it(tmp_path, monkeypatch, target, kwargs):
    if target not in fxforge.targets():
        pytest.skip(f"no {target} engine here")
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: True)
    compiled = fxforge.compile(toy_model(), target, example_inputs=X, **kwargs)
    path = fxforge.save(compiled, tmp_path / "m.fxf")
    assert not fxforge.read_metadata(path)["isa"]["requires_vnni"]
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)
    with torch.inference_mode():
        assert torch.equal(fxforge.load(path)(X), compiled(X))


@pytest.mark.skipif("x86" not in fxforge.targets(), reason="no x86 int8 engine here")
def test_the_torchscript_export_records_its_engine_and_cpu_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: True)
    compiled = fxforge.compile(toy_model(), "x86", example_inputs=X, calibration=batches(4))
    path = save_torchscript(compiled, tmp_path / "m.pt", X)
    meta = torchscript_metadata(path)
    assert meta["engine"] == compiled.quant_options.runtime_engine == "onednn" and meta["isa"]["requires_vnni"]
    scripted = load_torchscript(path)
    with quantized_engine(meta["engine"]), torch.inference_mode():
        assert torch.equal(scripted(X), compiled(X))
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)
    with pytest.raises(fxforge.BackendUnavailableError, match="saturate here without VNNI"):
        load_torchscript(path)


def test_a_graph_nested_in_a_runtime_module_is_stored_as_data(tmp_path, fp32_model):
    """The cuda target wraps its lowered graph in a CudaRuntime: torch.fx would pickle that graph as code."""
    inner = fp32_model.graph_module
    wrapped = wrap_in_runtime(inner, CudaRuntime(inner, capture=False))
    compiled = fxforge.CompiledModule(wrapped, "cpu", fp32_model.pipeline, fp32_model.report)
    path = fxforge.save(compiled, tmp_path / "m.fxf")
    assert "torch.fx.graph_module.reduce_graph_module" not in stored_globals(members(path)["model.pt"])
    loaded = fxforge.load(path)
    assert isinstance(loaded.graph_module.get_submodule("cuda_runtime"), CudaRuntime)
    with torch.inference_mode():
        assert torch.equal(loaded(X), compiled(X))


def test_checksums_must_cover_every_member(saved):
    rewrite(saved, {}, meta={"members": {}}, fix_checksums=False)
    with pytest.raises(fxforge.ArtifactError, match="checksums do not cover the members"):
        fxforge.load(saved)

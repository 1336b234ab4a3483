"""The fxforge command line: every command in process through main(argv), and the console script once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fxforge
from fxforge.cli import main
from fxforge.commands import load_model
from fxforge.numerics.metrics import max_errors
from fxforge.pipeline.targets import all_targets
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import one_intra_op_thread

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)

MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        return model, torch.randn(1, 3, 16, 16)

    def broken():
        raise RuntimeError("no weights here")
""")


@pytest.fixture
def model_file(tmp_path) -> str:
    path = tmp_path / "tiny.py"
    path.write_text(MODEL_FILE)
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_teaches_with_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "torchvision:NAME" in out and "fxforge show torchvision:resnet18 --after fold-bn" in out
    code, out, _ = run(capsys, "show", "--help")
    assert code == 0 and "--after PASS" in out and "examples:" in out


def test_help_version_and_parse_errors_do_not_import_torch():
    """The parser, --help, --version and the errors argparse catches answer before torch loads."""
    code = ("import sys; from fxforge.cli import main; "
            "codes = [main(['--help']), main(['show', '--help']), main(['--version']), main(['frobnicate']), "
            "main(['compile', 'm.py:f', '--input-shape', '1,a'])]; "
            "print(codes, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fxforge')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "invalid choice" in done.stderr and "is not a shape" in done.stderr
    assert done.stdout.splitlines()[-1] == "[0, 0, 0, 2, 2] ['fxforge', 'fxforge.cli', 'fxforge.version']"


def test_targets_and_pipeline(capsys):
    code, out, _ = run(capsys, "targets")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert set(rows) == {"target", *all_targets()}
    assert all(rows[t].split()[1] == "usable" for t in fxforge.targets())
    status_column = {line.index(line.split()[1]) for line in rows.values()}
    assert len(status_column) == 1  # aligned: every status starts in the same column
    code, out, _ = run(capsys, "pipeline", "x86")
    assert code == 0 and out.strip() == fxforge.pipeline_for("x86")
    code, out, _ = run(capsys, "pipeline", "x86", "--quantization", "dynamic", "--explain")
    assert out.splitlines()[0] == fxforge.pipeline_for("x86", "dynamic") and "quantize-dynamic" in out


def test_compile_file_model_with_html_report(capsys, model_file, tmp_path):
    code, out, _ = run(capsys, "compile", f"{model_file}:make", "--target", "cpu", "--report", str(tmp_path / "r"))
    assert code == 0 and "fxforge compile report: target=cpu" in out and "folded 1 BatchNorm(s)" in out
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.txt", "report.json", "report.html"}
    assert "fold-bn" in (tmp_path / "r" / "report.html").read_text()


def test_compile_torchvision_int8_with_random_calibration(capsys):
    pytest.importorskip("torchvision")
    code, out, _ = run(capsys, "compile", "torchvision:resnet18", "--target", "x86", "--calibration", "random:2",
                       "--input-shape", "1,3,32,32")
    assert code == 0 and "quantization: static int8 for x86" in out and "calibrated on 2 batches" in out


def test_compile_saves_a_model_that_loads_without_its_class(capsys, model_file, tmp_path):
    path = tmp_path / "m.fxf"
    code, out, _ = run(capsys, "compile", f"{model_file}:make", "--target", "x86", "--calibration", "random:2",
                       "--save", str(path))
    assert code == 0 and f"compiled model saved to {path}" in out
    loaded = fxforge.load(path)
    assert loaded.target == fxforge.read_metadata(path)["target"] == "x86"
    model, example = load_model(f"{model_file}:make", None)
    with torch.inference_mode():
        assert outputs_sqnr_db(model(example), loaded(example)) >= 15  # the int8 model, not just any module


def test_show_draws_a_stage_and_a_diff(capsys, model_file, tmp_path):
    code, out, _ = run(capsys, "show", f"{model_file}:make", "--after", "fold-bn", "--diff", "-o",
                       str(tmp_path / "d.dot"))
    assert code == 0 and "after fold-bn, diff against normalize-relu" in out
    dot = (tmp_path / "d.dot").read_text()
    assert "status-removed" in dot and "folded into" in dot
    code, _, _ = run(capsys, "show", f"{model_file}:make", "-o", str(tmp_path / "final.dot"))
    assert code == 0 and "OneDnnConv2d" in (tmp_path / "final.dot").read_text()


def test_bench_times_eager_and_each_target(capsys, model_file):
    code, out, _ = run(capsys, "bench", f"{model_file}:make", "--target", "cpu", "x86", "--repeats", "3",
                       "--warmup", "1")
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("eager") and " ms" in line for line in lines)
    assert any(line.startswith("cpu") and "x eager" in line and "max rel err" in line for line in lines)
    assert any(line.startswith("x86") and "SQNR" in line for line in lines)  # int8: calibrated on random:8


@pytest.mark.parametrize("argv, message", [
    (["compile", "resnet18"], "should be torchvision:NAME"),
    (["compile", "torchvision:resnet1"], "Did you mean 'resnet18'"),
    (["compile", "no/such/file.py:make"], "does not exist"),
    (["compile", "{file}:mkae"], "Did you mean 'make'"),
    (["compile", "{file}:make", "--calibration", "real:8"], "use random:N"),
    (["compile", "{file}:make", "--input-shape", "1,3,a"], "is not a shape"),
    (["show", "{file}:make", "-o", "graph.jpeg"], ".svg, .png, .pdf or .dot"),
    (["frobnicate"], "invalid choice"),
    (["pipeline", "x68"], "Did you mean 'x86'"),
    (["compile", "{file}:make", "--target", "nope"], "'nope' is not a target"),
    (["bench", "{file}:make", "--target", "cpu", "x68"], "Did you mean 'x86'"),
    (["compile", "{file}:make", "--pipeline", "fold-bn,fuse-conf"], "fuse-conv"),
    (["pipeline", "cpu", "--quantization", "dynamic"], "target 'cpu' runs in fp32"),
    (["show", "{file}:make", "--after", "fold_bn", "-o", "g.svg"], "Did you mean 'fold-bn'"),
    (["show", "{file}:broken", "--after", "fold-bnn", "-o", "g.svg"], "Did you mean 'fold-bn'"),  # before any work
    (["compile", "torchvision:resnet18", "--input-shape", "1,3"], "fails on an input of that shape"),
])
def test_usage_errors_exit_2(capsys, model_file, argv, message):
    if any(a.startswith("torchvision:") for a in argv):
        pytest.importorskip("torchvision")
    code, _, err = run(capsys, *(a.replace("{file}", model_file) for a in argv))
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["compile", "{file}:make", "--target", "x86"], "--calibration random:8"),
    (["compile", "{file}:broken"], "no weights here"),
])
def test_compile_errors_exit_1_with_the_typed_message(capsys, model_file, argv, message):
    code, _, err = run(capsys, *(a.replace("{file}", model_file) for a in argv))
    assert code == 1 and message in err and "Traceback" not in err


def test_debug_shows_the_traceback(model_file):
    with pytest.raises(fxforge.CompileError, match="no weights here"):
        main(["--debug", "compile", f"{model_file}:broken"])


def test_json_outputs(capsys, model_file, tmp_path):
    code, out, _ = run(capsys, "targets", "--json")
    targets = json.loads(out)
    assert code == 0 and {t["name"] for t in targets if t["usable"]} == set(fxforge.targets())
    assert all(t["reason"] for t in targets if not t["usable"])
    code, out, _ = run(capsys, "pipeline", "x86", "--json")
    listed = json.loads(out)
    assert code == 0 and listed["pipeline"] == fxforge.pipeline_for("x86")
    assert ",".join(p["spec"] for p in listed["passes"]) == listed["pipeline"]
    code, out, err = run(capsys, "compile", f"{model_file}:make", "--json", "--report", str(tmp_path / "r"))
    report = json.loads(out)  # stdout is the JSON alone; the note about the files goes to stderr
    assert code == 0 and report["target"] == "cpu" and report["files"]["report"] == str(tmp_path / "r")
    assert report["schema_version"] >= 1 and report["fxforge_version"] == fxforge.__version__
    assert report["torch_version"] == torch.__version__ and "report written" in err
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["schema_version"] == report["schema_version"] and saved["passes"] == report["passes"]
    code, out, _ = run(capsys, "bench", f"{model_file}:make", "--target", "cpu", "--repeats", "2", "--warmup", "0",
                       "--json")
    bench = json.loads(out)
    assert code == 0 and [r["target"] for r in bench["results"]] == ["eager", "cpu"]
    assert bench["results"][1]["ms"] > 0 and bench["results"][1]["max_rel_error"] < 1e-3


def test_verbose_logs_one_line_per_pass_and_quiet_hides_warnings(capsys, model_file):
    code, _, err = run(capsys, "-v", "compile", f"{model_file}:make", "--json")
    pass_lines = [line for line in err.splitlines() if line.startswith("INFO fxforge.pipeline.manager: pass ")]
    assert code == 0 and len(pass_lines) == len(fxforge.pipeline_for("cpu").split(","))
    fold_bn = pass_lines[fxforge.pipeline_for("cpu").split(",").index("fold-bn")]
    assert "fold-bn" in fold_bn and "-> " in fold_bn and " nodes" in fold_bn
    code, _, err = run(capsys, "compile", f"{model_file}:make", "--json")
    assert code == 0 and "INFO" not in err  # the default shows warnings only
    assert not logging.getLogger("fxforge").handlers[1:]  # main removed its handler


def test_logger_records_each_pass(caplog, model_file):
    model, example = load_model(f"{model_file}:make", None)
    with caplog.at_level(logging.INFO, logger="fxforge"):
        compiled = fxforge.compile(model, "cpu", example_inputs=example)
    records = [r for r in caplog.records if r.name == "fxforge.pipeline.manager"]
    assert [r.getMessage().split(":")[0] for r in records] == [f"pass {p.spec}" for p in compiled.report.passes]
    assert all(r.levelno == logging.INFO for r in records)


def test_library_is_quiet_by_default(model_file):
    code = (f"import fxforge, runpy; model, x = runpy.run_path({model_file!r})['make'](); "
            f"fxforge.compile(model.eval(), 'cpu', example_inputs=x)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""


def _console_script() -> str:
    found = Path(sys.executable).with_name("fxforge")
    script = str(found) if found.exists() else shutil.which("fxforge")
    assert script, "the fxforge console script is not installed: pip install -e . (make test does it)"
    return script


def test_console_script(model_file, tmp_path):
    done = subprocess.run([_console_script(), "pipeline", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == fxforge.pipeline_for("cpu")
    done = subprocess.run([_console_script(), "compile", f"{model_file}:make", "--target", "nope"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "'nope' is not a target" in done.stderr and "Traceback" not in done.stderr


def test_int8_compile_prints_no_torch_deprecation_warning(model_file):
    """torch warns once per process when the first quantized tensor is made: fxforge's own calls filter it."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    done = subprocess.run([_console_script(), "compile", f"{model_file}:make", "--target", "fbgemm",
                           "--calibration", "random:2"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "quantization: static int8 for fbgemm" in done.stdout
    assert "deprecated" not in done.stderr and "quantize_per_tensor" not in done.stderr


# ---- export and info --------------------------------------------------------------------------------------

def test_export_writes_a_program_that_info_describes(capsys, model_file, tmp_path):
    out = tmp_path / "tiny.pt2"
    code, printed, err = run(capsys, "export", f"{model_file}:make", str(out))
    assert code == 0, err
    assert "torch.export" in printed and out.is_file()
    code, printed, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(printed)
    assert code == 0 and info["kind"] == "pt2" and info["fxforge"]["target"] == "cpu"
    assert info["inputs"] == [{"name": "input", "shape": ["1", "3", "16", "16"], "dtype": "float32"}]
    assert info["outputs"][0]["shape"] == ["1", "4"]
    assert any(op.startswith("mkldnn._convolution_pointwise") for op in info["ops"])
    code, printed, _ = run(capsys, "info", str(out))
    assert code == 0 and "kind: pt2" in printed and "target: cpu" in printed


def test_export_from_a_saved_model(capsys, model_file, tmp_path):
    saved, out = tmp_path / "tiny.fxf", tmp_path / "tiny.pt2"
    assert run(capsys, "compile", f"{model_file}:make", "--save", str(saved))[0] == 0
    code, _, err = run(capsys, "export", str(saved), str(out))
    assert code == 0, err
    loaded = torch.export.load(out).module()
    with torch.inference_mode():
        expected = fxforge.load(saved)(torch.ones(1, 3, 16, 16))
    assert torch.equal(loaded(torch.ones(1, 3, 16, 16)), expected)


def test_export_writes_dynamic_int8_as_a_program_and_as_onnx(capsys, model_file, tmp_path):
    for out in (tmp_path / "dyn.pt2", tmp_path / "dyn.onnx"):
        code, _, err = run(capsys, "export", f"{model_file}:make", str(out), "--target", "x86",
                           "--quantization", "dynamic")
        assert code == 0, err
        info = json.loads(run(capsys, "info", str(out), "--json")[1])
        assert info["fxforge"]["target"] == "x86"
    assert "aten._int_mm.default" in info_ops(capsys, tmp_path / "dyn.pt2")
    assert "MatMulInteger" in info_ops(capsys, tmp_path / "dyn.onnx")


def info_ops(capsys, path) -> list[str]:
    return json.loads(run(capsys, "info", str(path), "--json")[1])["ops"]


def test_export_refuses_an_unknown_suffix_before_loading(capsys, tmp_path):
    code, _, err = run(capsys, "export", "torchvision:not_a_model", str(tmp_path / "m.bin"))
    assert code == 2 and ".pt2 (pt2)" in err and "not_a_model" not in err


def test_info_on_a_saved_model_checks_its_members(capsys, model_file, tmp_path):
    saved = tmp_path / "tiny.fxf"
    assert run(capsys, "compile", f"{model_file}:make", "--save", str(saved))[0] == 0
    code, printed, _ = run(capsys, "info", str(saved), "--json")
    info = json.loads(printed)
    assert code == 0 and info["kind"] == "fxf" and info["target"] == "cpu" and info["checksums"] == "ok"
    assert info["torch_version"] == torch.__version__ and "requires_vnni" in info["isa"]
    assert info["inputs"] == ["input: (input.batch[0..], 3, 16, 16)"]  # the batch dim is dynamic
    damaged = tmp_path / "damaged.fxf"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data + b"edited" if item.filename == "report.txt" else data)
    info = json.loads(run(capsys, "info", str(damaged), "--json")[1])
    assert info["checksums"].startswith("failed") and "report.txt" in info["checksums"]


def test_export_writes_an_onnx_model_that_runs_as_the_compiled_one(capsys, model_file, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    saved, out = tmp_path / "tiny.fxf", tmp_path / "tiny.onnx"
    assert run(capsys, "compile", f"{model_file}:make", "--save", str(saved))[0] == 0
    code, _, err = run(capsys, "export", str(saved), str(out))
    assert code == 0, err
    info = json.loads(run(capsys, "info", str(out), "--json")[1])
    assert info["kind"] == "onnx" and info["qdq"] is False
    x = torch.randn(3, 3, 16, 16)  # another batch size: the batch dimension stays dynamic
    (got,) = ort.InferenceSession(str(out)).run(None, {info["inputs"][0]["name"]: x.numpy()})
    with torch.inference_mode():
        expected = fxforge.load(saved)(x)
    assert max_errors(expected, torch.from_numpy(got))[1] <= 1e-5


def test_info_on_an_onnx_model(capsys, tmp_path):
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    scale = helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [0.1])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [x], [y], initializer=[scale])
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, printed, _ = run(capsys, "info", str(path), "--json")
    info = json.loads(printed)
    assert code == 0 and info["kind"] == "onnx" and info["qdq"] is True and info["opset"] == {"ai.onnx": 17}
    assert info["inputs"] == [{"name": "x", "shape": ["batch", "4"], "dtype": "float"}]


def test_info_on_an_unknown_file_is_a_typed_error(capsys, tmp_path):
    path = tmp_path / "notes.pt2"
    path.write_text("not a model")
    code, _, err = run(capsys, "info", str(path))
    assert code == 1 and "ArtifactError" in err and "none of the files fxforge info reads" in err
    code, _, err = run(capsys, "info", str(tmp_path / "missing.fxf"))
    assert code == 1 and "does not exist" in err

"""Fixtures for the benchmark scripts' tests: each script imported as the top-level module it is (the scripts
import each other that way). The scripts build torchvision models at import: without torchvision (the
oldest-torch CI venv, where no torchvision build pairs with the CPU torch served there) the tests are skipped,
saying why."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(autouse=True)
def _needs_torchvision() -> None:
    pytest.importorskip("torchvision", reason="the benchmark scripts import torchvision")


def _script(name: str):
    @pytest.fixture(name=name)
    def fixture(monkeypatch):
        monkeypatch.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module(name)

    return fixture


bench_cpu = _script("bench_cpu")
bench_cuda = _script("bench_cuda")
bench_int8 = _script("bench_int8")
bench_onnx_qdq = _script("bench_onnx_qdq")
breakdown = _script("breakdown")
int8_profile = _script("int8_profile")
openvino_profile = _script("openvino_profile")
bench_aoti = _script("bench_aoti")

"""target="auto": the fastest usable target that keeps fp32-level accuracy; int8 only when quantization is asked."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from tiny_bert import tiny_bert
from torch import nn

import fxforge
from fxforge.pipeline import targets as registry
from fxforge.search import auto
from helpers import one_intra_op_thread

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(1, 3, 16, 16)


def test_auto_on_this_machine_takes_a_float_target_and_says_why():
    model, x = _model()
    compiled = fxforge.compile(model, "auto", example_inputs=x)
    record = compiled.report.auto
    assert record.chosen == compiled.target == compiled.report.target
    assert [c.target for c in record.candidates] == [t.name for t in auto.candidates(int8=False)]
    assert all(c.ms > 0 for c in record.candidates)
    chosen = next(c for c in record.candidates if c.target == compiled.target)
    assert chosen.accepted and registry.resolve_target(compiled.target).quant_backend is None
    for c in record.candidates:  # a reduced-precision candidate is taken only above the floor
        if c.accepted and c.target not in ("cpu", "cuda-fp32"):
            assert not (c.output_sqnr_db < auto.MIN_SQNR_DB)
    assert "target auto: chose" in str(compiled.report)


def test_auto_takes_int8_only_when_quantization_is_asked():
    model, x = _model()
    compiled = fxforge.compile(model, "auto", example_inputs=x, calibration=[torch.randn_like(x) for _ in range(3)])
    assert compiled.report.quantization is not None and compiled.report.auto.chosen == compiled.target
    assert {c.target for c in compiled.report.auto.candidates} == {t.name for t in auto.candidates(int8=True)}
    assert auto.quantization_asked({"quantization": "dynamic"}, None)
    assert not auto.quantization_asked({"calibration": None, "skip": ()}, None)


@pytest.fixture
def stubbed_gpu(monkeypatch):
    """Every CUDA target reported usable (nothing is run on it: the trials below are made up)."""
    stubbed = {name: dataclasses.replace(t, availability=lambda: None) if t.device == "cuda" else t
               for name, t in registry.all_targets().items()}
    monkeypatch.setattr(registry, "_TARGETS", stubbed)
    return stubbed


def _trial(target: registry.Target, ms: float, sqnr_db: float, reduced: bool) -> auto.Trial:
    report = SimpleNamespace(output_sqnr_db=sqnr_db if reduced else None)
    return auto.Trial(target, SimpleNamespace(report=report), ms / 1e3, sqnr_db)


@pytest.mark.parametrize("fp16_sqnr, expected", [(60.0, "cuda"), (25.0, "cuda-fp32")])
def test_auto_with_a_gpu_takes_fp16_only_above_the_floor(stubbed_gpu, fp16_sqnr, expected):
    names = [t.name for t in auto.candidates(int8=False)]
    assert {"cuda", "cuda-bf16", "cuda-fp32", "cpu"} <= set(names)
    made_up = {"cpu": (5.0, 150.0, False), "cpu-bf16": (4.0, 30.0, True), "cuda": (1.0, fp16_sqnr, True),
               "cuda-bf16": (1.0, 30.0, True), "cuda-fp32": (2.0, 140.0, False)}
    trials = [_trial(stubbed_gpu[n], *made_up[n]) for n in names if n in made_up]  # others: not measured here
    best, record = auto.choose(trials)
    assert best.target.name == record.chosen == expected
    rejected = {c.target for c in record.candidates if not c.accepted}
    assert {"cpu-bf16", "cuda-bf16"} <= rejected and ("cuda" in rejected) == (fp16_sqnr < auto.MIN_SQNR_DB)


def test_int8_candidates_are_the_targets_with_the_asked_mode():
    static, dynamic = auto.candidates(int8=True), auto.candidates(int8=True, mode="dynamic")
    assert {t.name for t in dynamic} == {t.name for t in static if "dynamic" in t.mode_pipelines}
    if "openvino-int8" in fxforge.targets():  # static int8 only
        assert "openvino-int8" in {t.name for t in static} - {t.name for t in dynamic}


def test_auto_keeps_the_first_target_unless_another_is_clearly_faster(stubbed_gpu):
    cpu, fp32 = stubbed_gpu["cpu"], stubbed_gpu["cuda-fp32"]
    best, _ = auto.choose([_trial(cpu, 1.0, 150.0, False), _trial(fp32, 0.95, 140.0, False)])
    assert best.target.name == "cpu"  # 5% is within timing noise
    best, _ = auto.choose([_trial(cpu, 1.0, 150.0, False), _trial(fp32, 0.5, 140.0, False)])
    assert best.target.name == "cuda-fp32"


def test_auto_without_an_accepted_target_says_what_each_one_lacked(stubbed_gpu):
    failed = auto.Trial(stubbed_gpu["cpu"], error="UnsupportedOpError: no kernel")
    with pytest.raises(fxforge.BackendUnavailableError, match="cpu: compile failed.*cuda: output SQNR 20.0 dB"):
        auto.choose([failed, _trial(stubbed_gpu["cuda"], 1.0, 20.0, True)])


def test_auto_takes_keyword_inputs_and_model_outputs_of_an_exported_bert():
    model, inputs = tiny_bert()
    compiled = fxforge.compile(model, "auto", example_inputs=inputs)
    record = compiled.report.auto
    assert [c.target for c in record.candidates] == [t.name for t in auto.candidates(int8=False)]
    assert all(c.ms > 0 and c.output_sqnr_db is not None for c in record.candidates)
    chosen = next(c for c in record.candidates if c.target == compiled.target)
    assert chosen.accepted
    with torch.no_grad():
        expected, got = model(**inputs), compiled(**inputs)
    assert type(got) is type(expected)
    assert chosen.output_sqnr_db == pytest.approx(fxforge.quant.sqnr.outputs_sqnr_db(expected, got))

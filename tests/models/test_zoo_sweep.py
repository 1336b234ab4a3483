"""Zoo sweep in CI: torchvision classifiers of every family (benchmarks/zoo_sweep.py's CI_MODELS) through every
CPU target, with the sweep script's own ``sweep_case`` (so the table in benchmarks/ZOO.md and this test measure
the same thing).

Per (model, target): the compile succeeds and the model runs; ``cpu`` is within 1e-4 relative of eager on a
fresh batch; int8 targets reach the model's SQNR floor (zoo_sweep.SQNR_FLOOR_DB, ~1.5 dB under the value in
ZOO.md; MEANINGFUL_DB where a model has none: an xfail); the whole model traced (no leaf fallback); the
user's model is untouched. Expected failures are zoo_sweep.XFAIL, each with its reason (not strict: the
numbers depend on the CPU, VNNI gives x86 / fbgemm 8-bit activations).

Budget: small inputs (64x64 unless a model needs more), one calibration batch; CI_MODELS (22 models, one or
two per family) is the subset of the 78 swept models that fits: ~3.5 min on the 2-core machine of ZOO.md,
where all 78 take ~30 min.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_unchanged, one_intra_op_thread, state_snapshot

pytest.importorskip("torchvision")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo_sweep.py"
_spec = importlib.util.spec_from_file_location("zoo_sweep", _SCRIPT)
zoo = sys.modules["zoo_sweep"] = importlib.util.module_from_spec(_spec)  # registered first: its dataclasses
_spec.loader.exec_module(zoo)

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


@pytest.fixture(scope="module", params=zoo.CI_MODELS)
def zoo_model(request: pytest.FixtureRequest):
    name = request.param
    model = zoo.make_model(name)
    x, expected = zoo.reference_output(name, model)
    assert expected.std() > 1e-2, f"{name}: the reference output vanishes: a comparison would be meaningless"
    return name, model, state_snapshot(model), (x, expected)


def test_every_ci_model_has_a_floor_for_every_int8_target():
    missing = [(m, t) for m in zoo.CI_MODELS for t in zoo.INT8_TARGETS
               if zoo.sqnr_floor(m, t) is None and (m, t) not in zoo.XFAIL]
    assert not missing, f"no SQNR floor recorded for {missing[:5]}"


@pytest.mark.parametrize("target", zoo.TARGETS)
def test_model_compiles_for_target_and_matches_eager(zoo_model, target: str, request: pytest.FixtureRequest):
    name, model, snapshot, reference = zoo_model
    if (name, target) in zoo.XFAIL:
        request.applymarker(pytest.mark.xfail(reason=zoo.XFAIL[(name, target)]))
    case, _ = zoo.sweep_case(name, target, model, reference)
    assert case.error is None, f"{name}/{target}: {case.error}"
    assert case.traced == "yes", f"{name}: {case.traced}"
    if target == "cpu":
        assert case.rel_error <= zoo.RTOL, f"{name}: relative error {case.rel_error:.2g}"
    else:
        floor = zoo.sqnr_floor(name, target) or zoo.MEANINGFUL_DB
        assert case.sqnr_db >= floor, f"{name}/{target}: SQNR {case.sqnr_db:.1f} dB < floor {floor} dB"
    assert_unchanged(model, snapshot)
    assert not torch.is_inference_mode_enabled()

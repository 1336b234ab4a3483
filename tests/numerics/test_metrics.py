"""The numeric oracle: max_errors and the SQNR functions, closed-form, and non-finite values made loud.

A NaN or infinity where the reference has a finite value must fail every check that reads these numbers:
``max_errors`` gives inf, the SQNR functions -inf. Each consumer (tests' ``rel_error``, the report's
``max_rel_error``, ``verify="numeric"``, ``debug.bisect``) is checked on a compile whose output turns NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
from quant_helpers import batches, toy_model
from torch import fx

import fxforge
from fxforge.errors import NumericMismatchError
from fxforge.numerics import max_errors
from fxforge.quant.sqnr import outputs_sqnr_db, sqnr_db
from helpers import close_to_eager, one_intra_op_thread, rel_error

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
NAN, INF = float("nan"), float("inf")
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
needs_int8 = pytest.mark.skipif(INT8 is None, reason="no int8 engine in this torch build")
X = batches(1, seed=7)[0]


def _with(value: float, at: int = 0, n: int = 8) -> torch.Tensor:
    t = torch.linspace(-1.0, 1.0, n)
    t[at] = value
    return t


# --- max_errors --------------------------------------------------------------------------------------------


def test_max_errors_closed_form():
    expected = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    actual = expected + torch.tensor([[0.0, 0.0], [0.25, -0.125]])
    assert max_errors(actual, expected) == (0.25, 0.25 / 4.0)
    assert max_errors((actual, {"b": expected}), (expected, {"b": expected})) == (0.25, 0.0625)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_value_on_one_side_is_an_infinite_error(bad: float):
    ref = _with(0.3, at=3)
    assert max_errors(_with(bad, at=3), ref) == (math.inf, math.inf)
    assert max_errors(ref, _with(bad, at=3)) == (math.inf, math.inf)
    assert max_errors(torch.full((8,), bad), ref) == (math.inf, math.inf)  # all of it: once (0.0, 0.0)
    assert max_errors((ref, _with(bad)), (ref, ref)) == (math.inf, math.inf)  # one output of several


def test_infinities_of_opposite_signs_differ_and_equal_non_finite_values_agree():
    assert max_errors(_with(INF), _with(-INF)) == (math.inf, math.inf)
    assert max_errors(_with(NAN), _with(NAN)) == (0.0, 0.0)  # eager's own NaN, reproduced
    assert max_errors(_with(INF), _with(INF)) == (0.0, 0.0)
    assert max_errors(_with(NAN) + 0.5, _with(NAN)) == (0.5, 0.5)  # the finite elements still count


def test_every_tolerance_check_fails_on_nan():
    ref = torch.randn(4, 5)
    nan = torch.full_like(ref, NAN)
    assert not rel_error(nan, ref) <= 1e-4
    assert not close_to_eager(nan, ref)
    assert close_to_eager(ref.clone(), ref)


# --- SQNR ----------------------------------------------------------------------------------------------------


def test_sqnr_db_closed_form():
    signal = torch.tensor([1.0, -1.0, 2.0, -2.0])  # power 10
    noise = torch.tensor([0.1, 0.1, -0.1, -0.3])  # power 0.12
    assert sqnr_db(signal, signal + noise) == pytest.approx(10 * math.log10(10 / 0.12), abs=1e-5)  # float32 inputs
    assert sqnr_db(signal, signal) == math.inf
    assert sqnr_db(torch.zeros(4), noise) == -math.inf


def test_outputs_sqnr_db_pools_every_output_independently_of_structure():
    """Two outputs of different shapes and a dict: signal 6 * 1 + 4 * 4 = 22, noise 6 * 0.01 + 4 * 0.04 = 0.22,
    so exactly 20 dB; a quantized value is dequantized first."""
    a, b = torch.ones(2, 3), torch.full((4,), 2.0)
    reference = (a, {"b": b})
    noisy = (a + 0.1, {"b": b - 0.2})
    assert outputs_sqnr_db(reference, noisy) == pytest.approx(20.0, abs=1e-5)  # float32 inputs
    assert outputs_sqnr_db(reference, [a + 0.1, {"b": b - 0.2}]) == pytest.approx(20.0, abs=1e-5)  # float32 inputs
    q = torch.quantize_per_tensor(b, 0.5, 0, torch.quint8)  # 2.0 exactly on the grid
    assert outputs_sqnr_db((a, b), (a + 0.1, q)) == pytest.approx(10 * math.log10(22 / 0.06), abs=1e-5)


def test_outputs_sqnr_db_of_gaussian_noise_matches_its_power():
    """Noise 10x smaller in amplitude than a unit-power signal: 20 dB, within the sampling error of 100k values."""
    g = torch.Generator().manual_seed(0)
    signal, noise = torch.randn(100_000, generator=g), torch.randn(100_000, generator=g) * 0.1
    assert outputs_sqnr_db((signal,), (signal + noise,)) == pytest.approx(20.0, abs=0.1)


def test_outputs_sqnr_db_of_other_structures_is_minus_infinity():
    a = torch.ones(2, 3)
    assert outputs_sqnr_db((a, a), (a,)) == -math.inf
    assert outputs_sqnr_db((a,), (a.reshape(3, 2),)) == -math.inf
    assert outputs_sqnr_db((), ()) == -math.inf


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_sqnr_of_a_non_finite_value_fails_every_floor(bad: float):
    ref = _with(0.3)
    for db in (sqnr_db(ref, _with(bad)), sqnr_db(_with(bad), ref), outputs_sqnr_db((ref, ref), (ref, _with(bad))),
               sqnr_db(ref, torch.full((8,), bad))):
        assert db == -math.inf and not db >= -1e300
    assert sqnr_db(_with(bad), _with(bad)) == math.inf  # the same non-finite value on both sides agrees


# --- consumers ---------------------------------------------------------------------------------------------


@fxforge.graph_pass(name="test-nan-output")
def nan_output(gm: fx.GraphModule, ctx) -> bool:
    """The planted defect: every graph output becomes NaN (what an overflow in a kernel gives)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        poisoned = fx.map_arg(output.args[0], lambda v: gm.graph.call_function(torch.mul, (v, NAN)))
    output.args = (poisoned,)
    gm.recompile()
    return True


def _with_nan_after(target: str, after: str) -> str:
    passes = fxforge.pipeline_for(target).split(",")
    passes.insert(passes.index(after) + 1, "test-nan-output")
    return ",".join(passes)


def test_report_max_rel_error_of_a_nan_output_is_infinite():
    compiled = fxforge.compile(toy_model(), "cpu", example_inputs=X, pipeline=_with_nan_after("cpu", "fold-bn"))
    assert compiled(X).isnan().all()
    assert compiled.report.max_rel_error == math.inf and compiled.report.max_abs_error == math.inf


def test_verify_numeric_names_the_pass_that_made_the_output_nan():
    with pytest.raises(NumericMismatchError, match="test-nan-output"):
        fxforge.compile(toy_model(), "cpu", example_inputs=X, pipeline=_with_nan_after("cpu", "fold-bn"),
                        verify="numeric")


@needs_int8
def test_verify_numeric_fails_a_nan_int8_output():
    with pytest.raises(NumericMismatchError, match="test-nan-output"):
        fxforge.compile(toy_model(), INT8, example_inputs=X, calibration=batches(2),
                        pipeline=_with_nan_after(INT8, "insert-qdq"), verify="numeric")


@pytest.mark.parametrize("target", ["cpu", INT8])
def test_bisect_names_the_pass_that_made_the_output_nan(target: str | None):
    if target is None:
        pytest.skip("no int8 engine in this torch build")
    after = "fold-bn" if target == "cpu" else "insert-qdq"
    kwargs = {"calibration": batches(2)} if target != "cpu" else {}
    result = fxforge.debug.bisect(toy_model(), target, X, pipeline=_with_nan_after(target, after), **kwargs)
    assert result.found and result.pass_name == "test-nan-output"
    assert all(s.ok for s in result.stages[:-1]) and not result.stages[-1].ok

"""Property tests: random conv/bn/relu/add/cat graphs compile to the same function, idempotently.

The graphs come from the fuzzer's generator (``fxforge.testing.graphs``) narrowed to conv / bn / relu / add / cat
(``PROPERTY_OPS``: every relu and add spelling, in place or not), with blocks (conv [-> bn] -> relu / + a value of
its shape / both, so that every fusion gets drawn) and, half of the time, one more output that may be any value:
residual adds, concats, in-place ops on shared values, values with several users and several outputs.
``FuzzModel`` runs a drawn graph. Properties, for every drawn graph:
  (a) the compiled model computes what eager computes (outputs within 1e-4 of max |eager|, or 1e-6 where
      they are near zero; same layout, same in-place effects on the input), at the example batch size and at
      another one;
  (b) the cpu pipeline is idempotent: running it a second time changes nothing;
  (c) the user's model is not modified.
Bugs this file found are named tests with minimal models in the test files of the components at fault.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import fxforge
from fxforge.testing import FuzzGraph, FuzzModel, OpChoices, graphs
from fxforge.testing.fuzz import ACT_SPELLINGS, BINARY_SPELLINGS, MORE_ACT_SPELLINGS, MORE_BINARY_SPELLINGS
from helpers import assert_unchanged, close_to_eager, one_intra_op_thread, rel_error, state_snapshot

RTOL = 1e-4
PIPELINE = fxforge.pipeline_for("cpu")
RELU_SPELLINGS = ACT_SPELLINGS + MORE_ACT_SPELLINGS  # nn.ReLU(inplace=.), F.relu(inplace=.), torch.relu(_), x.relu(_)
ADD_SPELLINGS = BINARY_SPELLINGS + MORE_BINARY_SPELLINGS  # a + b, torch.add, a.add, a += b, a.add_(b)
# Convs of int padding, zeros mode, at most 8 channels (quick compiles); the fuzzer (test_fuzz_graphs.py) draws the
# rest. lower-cpu keeps convs of other paddings eager, and a second cpu pipeline run after such a conv still adds a
# layout conversion: to-nhwc is not idempotent there yet.
PROPERTY_OPS = OpChoices(kinds=("conv", "conv", "bn", "act", "act", "add", "cat"), activations=("relu",),
                         act_spellings=RELU_SPELLINGS, binary_spellings=ADD_SPELLINGS, conv_paddings=("int",),
                         padding_modes=("zeros",), conv_channels=8)


def property_graphs() -> st.SearchStrategy[FuzzGraph]:
    return graphs(max_ops=5, choices=PROPERTY_OPS, residual_blocks=True, extra_output=True)


one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


# --- checks ------------------------------------------------------------------------------------------------


def _outputs(value: Any) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _check_same_function(model: nn.Module, compiled: nn.Module, x: torch.Tensor) -> None:
    """Compiled == eager on ``x``: values, layout and in-place effects on the input (each gets its own copy)."""
    x_eager, x_compiled = x.clone(), x.clone()
    with torch.no_grad():
        expected = model(x_eager)
    actual = compiled(x_compiled)
    assert close_to_eager(actual, expected, RTOL), f"rel error {rel_error(actual, expected):.3g}"
    for a, e in zip(_outputs(actual), _outputs(expected), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert a.is_contiguous() or not e.is_contiguous(), "eager gives a contiguous output, compiled does not"
    assert rel_error(x_compiled, x_eager) <= RTOL, "the input was mutated differently than in eager"


def _compile_and_check(graph: FuzzGraph) -> None:
    model = FuzzModel(graph)
    snapshot = state_snapshot(model)
    compiled = fxforge.compile(model, "cpu", example_inputs=graph.example())
    for batch in (graph.batch, 4 - graph.batch):  # the example batch size (1 or 3) and the other one
        _check_same_function(model, compiled, graph.example(batch, seed=2))
    assert_unchanged(model, snapshot)

    # (b) a second run of the pipeline finds nothing to do and leaves the same program
    twice = fxforge.compile(model, "cpu", example_inputs=graph.example(), pipeline=f"{PIPELINE},{PIPELINE}")
    n = len(compiled.report.passes)
    assert [r.spec for r in twice.report.passes] == [r.spec for r in compiled.report.passes] * 2
    changed = [r.spec for r in twice.report.passes[n:] if r.modified]
    assert not changed, f"second pipeline run still changed the graph: {changed}"
    assert twice.graph_module.code == compiled.graph_module.code
    assert_unchanged(model, snapshot)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(property_graphs())
def test_compiled_matches_eager_and_pipeline_is_idempotent(graph: FuzzGraph) -> None:
    _compile_and_check(graph)


# --- the harness itself ---------------------------------------------------------------------------------


def _drawn(graph: FuzzGraph) -> set[str]:
    """The op spellings and conv variants a graph holds, its output count and batch size."""
    seen = {"multi-output" if len(graph.outputs) > 1 else "single-output", f"batch-{graph.batch}"}
    for op in graph.ops:
        seen.add(f"{op.kind}-{op.params['spelling']}" if op.kind in ("act", "add") else op.kind)
        if op.kind == "conv":
            seen.update(f"conv-{k}" for k in ("groups", "stride", "dilation") if op.params[k] > 1)
            seen.update({"conv-1-channel"} if op.params["out_channels"] == 1 else ())
    return seen


def _rewritten(report: fxforge.CompileReport) -> set[str]:
    """The passes that changed the graph, the fusions made and the BNs kept, from a compile report."""
    seen = set()
    for record in report.passes:
        seen.update({f"{record.name} changed"} if record.modified else ())
        for note in record.notes:
            seen.update(f"fused conv+{kind}" for kind in re.findall(r"\d+ conv\+(add\+relu|add|relu)\b", note))
            seen.update({"bn kept"} if note.startswith("kept") else ())
    return seen


def test_generated_graphs_exercise_every_spelling_and_rewrite() -> None:
    """The strategy reaches every op spelling and conv variant, and the pipeline rewrites what it drew:
    every fusion kind, BN folded and BN kept, in-place and relu spellings normalized, convs lowered."""
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None, derandomize=True, phases=[Phase.generate], database=None)
    @given(property_graphs())
    def collect(graph: FuzzGraph) -> None:
        seen.update(_drawn(graph))
        seen.update(_rewritten(fxforge.compile(FuzzModel(graph), "cpu", example_inputs=graph.example()).report))

    collect()
    expected = {*(f"act-{s}" for s in RELU_SPELLINGS), *(f"add-{s}" for s in ADD_SPELLINGS), "conv", "bn", "cat",
                "conv-groups", "conv-stride", "conv-dilation", "conv-1-channel", "multi-output", "single-output",
                "batch-1", "batch-3", "normalize-inplace changed", "normalize-relu changed", "fold-bn changed",
                "fuse-conv changed", "lower-cpu changed", "fused conv+add+relu", "fused conv+add", "fused conv+relu",
                "bn kept"}
    assert expected <= seen, f"never seen: {sorted(expected - seen)}"


@pytest.mark.skipif(os.environ.get("FXFORGE_HYPOTHESIS_PROFILE") == "fuzz", reason="make fuzz draws new graphs")
def test_ci_draws_the_same_graphs_on_every_run() -> None:
    """The "ci" hypothesis profile (tests/conftest.py) derandomizes every property test that does not say
    otherwise: two runs of one test draw the same graphs, so CI never fails on a graph nobody has seen."""
    runs: list[list[FuzzGraph]] = [[], []]
    for drawn in runs:
        @settings(max_examples=10, phases=[Phase.generate])
        @given(property_graphs())
        def collect(graph: FuzzGraph) -> None:
            drawn.append(graph)  # noqa: B023  (each run appends to its own list, within the loop iteration)

        collect()
    assert runs[0] == runs[1] and len(set(map(repr, runs[0]))) > 1

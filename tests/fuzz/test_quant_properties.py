"""Property tests for static int8: random conv/bn/relu/add/cat/maxpool graphs with a flatten-linear head.

The graphs come from the fuzzer's generator (``fxforge.testing.graphs``) narrowed as in test_properties.py (conv /
bn / relu / add / cat with residual blocks: residual adds, concats, in-place ops on shared values, several outputs)
plus max-pools, with a classifier head on one output: ``[max_pool2d ->] flatten -> linear``. Properties, for every
drawn graph:
  (a) the observed graph (the x86 pipeline cut before insert-qdq) computes exactly, bit for bit, what the
      same pipeline without observers computes (an observer returns its input), on a fresh input;
  (b) the x86 reference int8 graph is well formed: no quantize reads a dequantize (directly or through
      ops that run on quantized tensors), every cat reads quantized inputs that share one scale buffer, and
      the graph returns float tensors;
  (c) its SQNR against the fp32 model on a fresh input is at least ``SQNR_FLOOR_DB``;
  (d) compiling twice gives identical qparams, weights and code (calibration is deterministic), and identical
      outputs where lower-x86 packed each layer for the same engine both times (its choice is timed).
(a), (b), (d) draw a fixed set of graphs in CI and new ones under ``make fuzz`` (the hypothesis profiles of
tests/conftest.py); (c) is a statistical bound and always runs a fixed (derandomized) set of graphs.
Together ~7 s on a 2-core machine: slow.
Graphs with in-place ops on values read elsewhere are included: the quantization plan keeps those values
fp32 (a cat reading one is a reported fp32 island); before it did, their int8 graphs lost the change.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from quant_helpers import dq_q_round_trips, quantize_nodes
from torch import fx, nn

import fxforge
from fxforge.backends.int8_packed import PackedWeight
from fxforge.graph.meta import fxmeta
from fxforge.quant.ops import pool_window
from fxforge.quant.plan import QPARAMS_KEY
from fxforge.quant.sqnr import outputs_sqnr_db
from fxforge.testing import FuzzGraph, FuzzModel, Op, OpChoices, graphs
from fxforge.testing.fuzz import ACT_SPELLINGS, BINARY_SPELLINGS, MORE_ACT_SPELLINGS, MORE_BINARY_SPELLINGS
from helpers import assert_unchanged, close_to_eager, one_intra_op_thread, state_snapshot

PIPELINE = fxforge.pipeline_for("x86")
OBSERVED = PIPELINE.split(",insert-qdq")[0]
FP32 = PIPELINE.split(",insert-observers")[0]
CALIBRATION_BATCHES, CALIBRATION_BATCH, FRESH_BATCH = 4, 32, 4
QUANT_OPS = OpChoices(kinds=("conv", "conv", "bn", "act", "act", "add", "cat", "pool"), activations=("relu",),
                      act_spellings=ACT_SPELLINGS + MORE_ACT_SPELLINGS,
                      binary_spellings=BINARY_SPELLINGS + MORE_BINARY_SPELLINGS, pools=("max",),
                      conv_paddings=("int",), padding_modes=("zeros",), conv_channels=8)
# SQNR floor for (c). Measured over 2,400 random graphs of this distribution (x86, 4 calibration batches of 32, a
# fresh batch of 4): 0.5% quantile ~19 dB, 5% ~30, median ~37; the lowest reference int8 graph reached 9.6 dB (one
# graph: the tail is legitimate, cat inputs of different magnitudes sharing one grid, fresh values beyond the
# calibrated range clipped). The fixed examples (c) runs reach 30.7 dB at the least, whichever engine lower-x86
# picks. 12 dB catches outright broken quantization: the in-place bug (test_quant_passes.py) gave -5 to 8 dB, and
# oneDNN's int8 grouped conv with padding >= kernel gives ~-8 dB where lower-x86 packs it for oneDNN.
SQNR_FLOOR_DB = 12.0


# Inputs at least 3 pixels wide: x86's int8 conv kernel crashes the process on a dilated one-tap conv over a
# 1-pixel-wide map (Conv2d(2, 6, 1, stride=2, padding=1, dilation=2) on 4x1), which lower-x86 does not avoid yet.
INPUT_SIZES = ((1, 2, 3, 4, 6), (1, 3, 5, 7, 9), (3, 5, 7, 9, 11))


def quant_graphs() -> st.SearchStrategy[FuzzGraph]:
    return graphs(max_ops=5, choices=QUANT_OPS, input_sizes=INPUT_SIZES, residual_blocks=True, extra_output=True,
                  head=True)


one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


# --- checks ------------------------------------------------------------------------------------------------


def _fresh(graph: FuzzGraph, batch: int = FRESH_BATCH) -> torch.Tensor:
    return graph.example(batch, seed=200 + batch)  # neither the example input nor a calibration batch


def _compile(model: nn.Module, graph: FuzzGraph, pipeline: str = PIPELINE) -> fxforge.CompiledModule:
    calibration = [graph.example(CALIBRATION_BATCH, seed=seed) for seed in range(CALIBRATION_BATCHES)]
    return fxforge.compile(model, "x86", example_inputs=graph.example(seed=100), calibration=calibration,
                           pipeline=pipeline)


def _outputs(value: object) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _is_dequantize(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "dequantize"


def _is_quantize(node: object) -> bool:
    return isinstance(node, fx.Node) and node.target is torch.quantize_per_tensor


def _source_qparams(node: fx.Node) -> str | None:
    """The scale buffer whose qparams a quantized value carries: walk up through the ops that run on
    quantized tensors (max-pool, flatten, relu, cat: their first tensor input) to the quantize node or the
    lowered int8 kernel (qparams as literals, read from the buffers in its meta) that made it; None for a
    float value."""
    while not _is_quantize(node):
        if fxmeta(node).get(QPARAMS_KEY):
            return fxmeta(node)[QPARAMS_KEY][0]
        if _is_dequantize(node) or node.op in ("placeholder", "get_attr") or not node.all_input_nodes:
            return None
        node = node.all_input_nodes[0]
    return node.args[1].target


_PASS_THROUGH_FUNCTIONS = {"flatten", "max_pool2d", "relu", "view", "reshape", "contiguous"}
_PASS_THROUGH_MODULES = (nn.MaxPool2d, nn.ReLU, nn.Flatten)


def _producer(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk up from a quantize's input through single-input shape / max-pool / relu ops (ops that would
    have run on the quantized tensor, had their input been quantized) to the node that computed the value.
    Max pooling over a one-element window is not one: the op table runs it in fp32 between its input's qparams
    (``share``, exact), by design."""
    def passes_through(n: fx.Node) -> bool:
        if len(n.all_input_nodes) != 1:
            return False
        if n.op == "call_module":
            module = gm.get_submodule(str(n.target))
            return isinstance(module, _PASS_THROUGH_MODULES) and pool_window(n, module) != 1
        return getattr(n.target, "__name__", n.target) in _PASS_THROUGH_FUNCTIONS and pool_window(n) != 1

    while passes_through(node):
        node = node.all_input_nodes[0]
    return node


def _check_int8_graph(compiled: fxforge.CompiledModule, x: torch.Tensor) -> None:
    """(b): no dq -> q (directly or through shape ops), every cat quantized with one scale for its inputs
    (unless the report lists it as an fp32 island: it reads a value changed in place), float outputs."""
    gm = compiled.graph_module
    assert not dq_q_round_trips(gm)
    for q in quantize_nodes(gm):
        assert not _is_dequantize(q.args[0]), f"{q.name} quantizes a dequantize"
        producer = _producer(gm, q.args[0])
        assert not _is_dequantize(producer), f"{q.name} requantizes {producer.name} through shape ops"
    islands = {island.split(":")[0]: island for island in compiled.report.quantization.islands}
    for cat in (n for n in gm.graph.nodes if n.target is torch.cat):
        if cat.name in islands:
            assert "changed in place" in islands[cat.name], islands[cat.name]
            continue
        inputs = cat.args[0]
        assert not any(_is_dequantize(a) for a in inputs), f"{cat.name} runs in fp32"
        scales = {_source_qparams(a) for a in inputs}
        assert None not in scales, f"{cat.name} reads a float value"
        assert len(scales) == 1, f"{cat.name} reads values with different qparams: {scales}"
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert not any(_is_quantize(a) for a in output.all_input_nodes)
    for y in _outputs(compiled(x.clone())):
        assert isinstance(y, torch.Tensor) and not y.is_quantized and y.dtype == torch.float32


def _engines(compiled: fxforge.CompiledModule) -> dict[str, str]:
    """The engine each layer's int8 weight was packed for: lower-x86 times the candidates (kernel_choice.py)."""
    return {name: m.engine for name, m in compiled.graph_module.named_modules() if isinstance(m, PackedWeight)}


def _qparams(compiled: fxforge.CompiledModule) -> dict[str, torch.Tensor]:
    """Every activation qparam buffer and every weight (int8 grid values and their scales)."""
    gm = compiled.graph_module
    found = {name: b for name, b in gm.named_buffers() if name.startswith("act_") or "weight_" in name}
    found.update({name: p for name, p in gm.named_parameters() if name.endswith("weight")})
    return found


def int8_sqnr(graph: FuzzGraph) -> float:
    """Property (c): SQNR of the x86 graph against the fp32 model on a fresh input."""
    model = FuzzModel(graph)
    compiled = _compile(model, graph)
    x = _fresh(graph)
    with torch.inference_mode():
        return outputs_sqnr_db(model(x.clone()), compiled(x.clone()))


_CONV_1X1 = dict(out_channels=2, kernel_size=(1, 1), stride=1, padding=0, dilation=1, groups=1, bias=False,
                 padding_mode="zeros")
# A cat of a lowered int8 add (qparams as literals) and the input: found by this test, a false alarm of
# its own checker (it looked for a quantize node behind the add); kept as an example that always runs.
_CAT_OF_LOWERED_ADD = FuzzGraph(shape=(2, 1, 3), batch=1, ops=(
    Op("conv", (0,), _CONV_1X1), Op("bn", (1,), {"affine": False}), Op("add", (2, 1), {"spelling": "inplace"}),
    Op("conv", (3,), _CONV_1X1), Op("add", (4, 4), {"spelling": "op"}), Op("cat", (5, 0), {"dim": 1}),
    Op("flatten", (6,), {"spelling": "torch"}), Op("linear", (7,), {"out_features": 4, "bias": True})),
    outputs=(8,), seed=0)


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quant_graphs())
@example(_CAT_OF_LOWERED_ADD)
def test_observers_exact_int8_graph_well_formed_and_deterministic(graph: FuzzGraph) -> None:
    """Properties (a), (b) and (d)."""
    model = FuzzModel(graph)
    snapshot = state_snapshot(model)
    x = _fresh(graph)

    # (a) observers are exact: bit-equal to the same pipeline without them (which computes eager's function)
    observed = _compile(model, graph, OBSERVED)
    fp32 = fxforge.compile(model, "cpu", example_inputs=graph.example(seed=100), pipeline=FP32)
    for a, e in zip(_outputs(observed(x.clone())), _outputs(fp32(x.clone())), strict=True):
        assert torch.equal(a, e), "the observed graph computes something else than the fp32 graph"
    with torch.no_grad():
        assert close_to_eager(fp32(x.clone()), model(x.clone()))

    # (b) the reference int8 graph is well formed, at the example batch size and another one
    compiled = _compile(model, graph)
    _check_int8_graph(compiled, x)
    _check_int8_graph(compiled, _fresh(graph, 4 - graph.batch))

    # (d) the same compile twice: the same qparams, weights, code and (for the same kernels) outputs
    again = _compile(model, graph)
    first, second = _qparams(compiled), _qparams(again)
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"{name} differs between two compiles"
    records = [(r.node, r.scale, r.zero_point) for r in compiled.report.quantization.layers]
    assert records == [(r.node, r.scale, r.zero_point) for r in again.report.quantization.layers]
    assert compiled.graph_module.code == again.graph_module.code
    if _engines(compiled) == _engines(again):  # a timed choice; the engines' kernels may round one step apart
        for a, b in zip(_outputs(compiled(x.clone())), _outputs(again(x.clone())), strict=True):
            assert torch.equal(a, b)
    assert_unchanged(model, snapshot)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(quant_graphs())
def test_int8_sqnr_floor(graph: FuzzGraph) -> None:
    """(c): SQNR >= SQNR_FLOOR_DB on a fresh input; a fixed set of examples (derandomized), because this is
    a statistical bound (see SQNR_FLOOR_DB), not an exact property."""
    db = int8_sqnr(graph)
    assert db >= SQNR_FLOOR_DB, f"SQNR {db:.1f} dB"


# --- the harness itself ---------------------------------------------------------------------------------


def _drawn(graph: FuzzGraph) -> set[str]:
    """The op kinds and spellings a graph holds, its head and its output count."""
    seen = {"multi-output" if len(graph.outputs) > 1 else "single-output"}
    for op in graph.ops:
        seen.add(f"{op.kind}-{op.params['spelling']}" if op.kind in ("act", "add", "pool") else op.kind)
    flatten = next(i for i, op in enumerate(graph.ops) if op.kind == "flatten")  # the head's
    src = graph.ops[flatten].srcs[0]
    head_pool = graph.ops[src - 1] if src == flatten else None  # the op right before it, when it reads that one
    seen.add(f"head pool-{head_pool.params['spelling']}" if head_pool and head_pool.kind == "pool" else "head")
    return seen


def test_generated_graphs_exercise_every_layer_kind() -> None:
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None, derandomize=True, phases=[Phase.generate], database=None)
    @given(quant_graphs())
    def collect(graph: FuzzGraph) -> None:
        seen.update(_drawn(graph))

    collect()
    expected = {"conv", "bn", "cat", "pool-module", "pool-F", "act-module", "act-F-inplace", "add-method-inplace",
                "add-inplace", "head", "head pool-module", "head pool-F", "multi-output", "single-output"}
    assert expected <= seen, f"never seen: {sorted(expected - seen)}"

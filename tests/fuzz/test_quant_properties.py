"""Property tests for static int8: random conv/bn/relu/add/cat/maxpool/flatten-linear graphs.

The graphs are ``tests/test_properties.py``'s (``graph_specs``: residual adds, concats, in-place ops on
shared values, several outputs), with shape-preserving max-pools spliced in at random places and a head on
one output: ``[max_pool2d ->] flatten -> linear``. Properties, for every drawn graph:
  (a) the observed graph (the x86 pipeline cut before insert-qdq) computes exactly, bit for bit, what the
      same pipeline without observers computes (an observer returns its input), on a fresh input;
  (b) the x86 reference int8 graph is well formed: no quantize reads a dequantize (directly or through
      ops that run on quantized tensors), every cat reads quantized inputs that share one scale buffer, and
      the graph returns float tensors;
  (c) its SQNR against the fp32 model on a fresh input is at least ``SQNR_FLOOR_DB``;
  (d) compiling twice gives identical qparams, weights and code (calibration is deterministic).
(a), (b), (d) explore new graphs on every run (hypothesis' defaults, as in tests/test_properties.py); (c) is
a statistical bound and runs a fixed (derandomized) set of graphs. Together ~7 s on a 2-core machine: slow.
Graphs with in-place ops on values read elsewhere are included: the quantization plan keeps those values
fp32 (a cat reading one is a reported fp32 island); before it did, their int8 graphs lost the change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from quant_helpers import dq_q_round_trips, quantize_nodes
from test_properties import GraphSpec, Layer, SpecModel, graph_specs
from torch import fx, nn

import fxforge
from fxforge.graph.meta import fxmeta
from fxforge.quant.plan import QPARAMS_KEY
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import assert_unchanged, one_intra_op_thread, rel_error, state_snapshot

PIPELINE = fxforge.pipeline_for("x86")
OBSERVED = PIPELINE.split(",insert-qdq")[0]
FP32 = PIPELINE.split(",insert-observers")[0]
CALIBRATION_BATCHES, CALIBRATION_BATCH, FRESH_BATCH = 4, 32, 4
MAXPOOL_SPELLINGS = ("nn.MaxPool2d", "F.max_pool2d")
# SQNR floor for (c). Measured on 2,500 random graphs (x86, 7-bit activations, as CPUs without VNNI then had,
# 4 calibration batches of 32, a fresh batch of 4): min 15.9 dB, 0.5% quantile 20.7, 5% 25.3, median 31.9.
# The tail is legitimate: cat inputs of different magnitudes sharing one grid, and fresh values beyond the
# calibrated range clipped (this is why calibration uses 32-sample batches: with 16, 1% fell below 12 dB).
# 12 dB leaves ~4 dB of margin below the lowest graph seen; the in-place bug pinned below gave -5 to 8 dB
# on ~10% of the graphs with in-place ops.
SQNR_FLOOR_DB = 12.0


one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


@dataclass(frozen=True)
class QuantSpec:
    body: GraphSpec  # maxpool layers (op "maxpool", kernel 3, stride 1, padding 1) spliced in
    head_output: int  # which of the body's outputs gets the head
    head_pool: str  # "" or a MAXPOOL_SPELLINGS entry: a 2x2 max-pool (ceil_mode) before flatten
    head_features: int


class QuantSpecModel(SpecModel):
    """SpecModel plus max-pool layers and a ``[max-pool ->] flatten -> linear`` head on one output."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec.body)
        self.qspec = spec
        for i, layer in enumerate(spec.body.layers):
            if layer.spelling == "nn.MaxPool2d":
                self.mods[str(i)] = nn.MaxPool2d(3, stride=1, padding=1)
        if spec.head_pool == "nn.MaxPool2d":
            self.head_pool = nn.MaxPool2d(2, ceil_mode=True)
        c, h, w = _value_shapes(spec.body)[spec.body.outputs[spec.head_output]]
        if spec.head_pool:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.fc = nn.Linear(c * h * w, spec.head_features)
        g = torch.Generator().manual_seed(spec.body.seed + 1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) / math.sqrt(c * h * w))
            self.fc.bias.copy_(torch.randn(self.fc.bias.shape, generator=g) * 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = super().forward(x)
        outputs = list(out) if isinstance(out, tuple) else [out]
        y = outputs[self.qspec.head_output]
        if self.qspec.head_pool == "nn.MaxPool2d":
            y = self.head_pool(y)
        elif self.qspec.head_pool:
            y = F.max_pool2d(y, 2, ceil_mode=True)
        outputs[self.qspec.head_output] = self.fc(torch.flatten(y, 1))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _layer(self, i: int, layer: Layer, values: list[torch.Tensor]) -> torch.Tensor:
        if layer.op != "maxpool":
            return super()._layer(i, layer, values)
        x = values[layer.srcs[0]]
        return self.mods[str(i)](x) if layer.spelling == "nn.MaxPool2d" else F.max_pool2d(x, 3, 1, 1)


def _value_shapes(spec: GraphSpec) -> list[tuple[int, int, int]]:
    """(C, H, W) of every value of a body (values[0] is the input)."""
    shapes = [spec.shape]
    for layer in spec.layers:
        src = shapes[layer.srcs[0]]
        if layer.op == "conv":
            kw = layer.conv
            extent = kw["dilation"] * (kw["kernel_size"] - 1) + 1
            hw = tuple((n + 2 * kw["padding"] - extent) // kw["stride"] + 1 for n in src[1:])
            shapes.append((kw["out_channels"], *hw))
        elif layer.op == "cat":
            shapes.append((sum(shapes[s][0] for s in layer.srcs), *src[1:]))
        else:
            shapes.append(src)
    return shapes


def _splice_maxpool(spec: GraphSpec, at: int, src: int, spelling: str) -> GraphSpec:
    """Insert a shape-preserving max-pool of value ``src`` as layer ``at`` (value ``at + 1``); later
    references to values ``>= at + 1`` shift by one."""
    def shift(i: int) -> int:
        return i + 1 if i > at else i

    layers = [replace(layer, srcs=tuple(map(shift, layer.srcs))) for layer in spec.layers]
    layers.insert(at, Layer("maxpool", (src,), spelling))
    return replace(spec, layers=tuple(layers), outputs=tuple(map(shift, spec.outputs)))


@st.composite
def quant_specs(draw: st.DrawFn) -> QuantSpec:
    body = draw(graph_specs())
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(body.layers)))
        src = draw(st.integers(0, at))  # any value computed before the insertion point
        body = _splice_maxpool(body, at, src, draw(st.sampled_from(MAXPOOL_SPELLINGS)))
    return QuantSpec(body, draw(st.integers(0, len(body.outputs) - 1)),
                     draw(st.sampled_from(("", *MAXPOOL_SPELLINGS))), draw(st.integers(4, 10)))


# --- checks ------------------------------------------------------------------------------------------------


def _inputs(spec: QuantSpec, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *spec.body.shape, generator=torch.Generator().manual_seed(seed))


def _fresh(spec: QuantSpec, batch: int = FRESH_BATCH) -> torch.Tensor:
    return _inputs(spec, batch, 200 + batch)  # neither the example input nor a calibration batch


def _compile(model: nn.Module, spec: QuantSpec, target: str = "x86", **kwargs) -> fxforge.CompiledModule:
    calibration = [_inputs(spec, CALIBRATION_BATCH, seed) for seed in range(CALIBRATION_BATCHES)]
    return fxforge.compile(model, target, example_inputs=_inputs(spec, spec.body.batch, 100),
                           calibration=calibration, **kwargs)


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
    have run on the quantized tensor, had their input been quantized) to the node that computed the value."""
    def passes_through(n: fx.Node) -> bool:
        if len(n.all_input_nodes) != 1:
            return False
        if n.op == "call_module":
            return isinstance(gm.get_submodule(str(n.target)), _PASS_THROUGH_MODULES)
        return getattr(n.target, "__name__", n.target) in _PASS_THROUGH_FUNCTIONS

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


def _qparams(compiled: fxforge.CompiledModule) -> dict[str, torch.Tensor]:
    """Every activation qparam buffer and every weight (int8 grid values and their scales)."""
    gm = compiled.graph_module
    found = {name: b for name, b in gm.named_buffers() if name.startswith("act_") or "weight_" in name}
    found.update({name: p for name, p in gm.named_parameters() if name.endswith("weight")})
    return found


def int8_sqnr(spec: QuantSpec) -> float:
    """Property (c): SQNR of the x86 graph against the fp32 model on a fresh input."""
    model = QuantSpecModel(spec)
    compiled = _compile(model, spec)
    x = _fresh(spec)
    with torch.inference_mode():
        return outputs_sqnr_db(model(x.clone()), compiled(x.clone()))


_CONV_1X1 = dict(out_channels=2, kernel_size=1, stride=1, padding=0, dilation=1, groups=1, bias=False)
# A cat of a lowered int8 add (qparams as literals) and the input: found by this test, a false alarm of
# its own checker (it looked for a quantize node behind the add); kept as an example that always runs.
_CAT_OF_LOWERED_ADD = QuantSpec(GraphSpec(1, (2, 1, 3), (
    Layer("conv", (0,), conv=_CONV_1X1), Layer("bn", (1,), affine=False), Layer("add", (2, 1), "a+=b"),
    Layer("conv", (3,), conv=_CONV_1X1), Layer("add", (4, 4), "a+b"), Layer("cat", (5, 0))), (6,), 0),
    head_output=0, head_pool="", head_features=4)


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quant_specs())
@example(_CAT_OF_LOWERED_ADD)
def test_observers_exact_int8_graph_well_formed_and_deterministic(spec: QuantSpec) -> None:
    """Properties (a), (b) and (d)."""
    model = QuantSpecModel(spec)
    snapshot = state_snapshot(model)
    x = _fresh(spec)

    # (a) observers are exact: bit-equal to the same pipeline without them (which computes eager's function)
    observed = _compile(model, spec, pipeline=OBSERVED)
    fp32 = fxforge.compile(model, "cpu", example_inputs=_inputs(spec, spec.body.batch, 100), pipeline=FP32)
    for a, e in zip(_outputs(observed(x.clone())), _outputs(fp32(x.clone())), strict=True):
        assert torch.equal(a, e), "the observed graph computes something else than the fp32 graph"
    with torch.no_grad():
        assert rel_error(fp32(x.clone()), model(x.clone())) <= 1e-4

    # (b) the reference int8 graph is well formed, at the example batch size and another one
    compiled = _compile(model, spec)
    _check_int8_graph(compiled, x)
    _check_int8_graph(compiled, _fresh(spec, 4 - spec.body.batch))

    # (d) the same compile twice: the same qparams, weights, code and outputs
    again = _compile(model, spec)
    first, second = _qparams(compiled), _qparams(again)
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"{name} differs between two compiles"
    records = [(r.node, r.scale, r.zero_point) for r in compiled.report.quantization.layers]
    assert records == [(r.node, r.scale, r.zero_point) for r in again.report.quantization.layers]
    assert compiled.graph_module.code == again.graph_module.code
    for a, b in zip(_outputs(compiled(x.clone())), _outputs(again(x.clone())), strict=True):
        assert torch.equal(a, b)
    assert_unchanged(model, snapshot)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(quant_specs())
def test_int8_sqnr_floor(spec: QuantSpec) -> None:
    """(c): SQNR >= SQNR_FLOOR_DB on a fresh input; a fixed set of examples (derandomized), because this is
    a statistical bound (see SQNR_FLOOR_DB), not an exact property."""
    db = int8_sqnr(spec)
    assert db >= SQNR_FLOOR_DB, f"SQNR {db:.1f} dB"


# --- the harness itself ---------------------------------------------------------------------------------


def test_generated_graphs_exercise_every_layer_kind() -> None:
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None, derandomize=True, phases=[Phase.generate], database=None)
    @given(quant_specs())
    def collect(spec: QuantSpec) -> None:
        seen.update(layer.spelling or layer.op for layer in spec.body.layers)
        seen.add(f"head {spec.head_pool or 'no pool'}")
        seen.add("multi-output" if len(spec.body.outputs) > 1 else "single-output")

    collect()
    expected = {"conv", "bn", "cat", *MAXPOOL_SPELLINGS, "nn.ReLU", "F.relu(inplace)", "Tensor.add_", "a+=b",
                "head no pool", *(f"head {s}" for s in MAXPOOL_SPELLINGS), "multi-output", "single-output"}
    assert expected <= seen, f"never seen: {sorted(expected - seen)}"

"""Per-layer engine choice for int8 kernels (backends/int8_kernel_choice.py) and its use by lower-x86.

Timing is never asserted: the choice is driven by fake clocks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from quant_helpers import batches, sqnr, toy_model
from torch import fx

import fxforge
from fxforge.backends.int8_kernel_choice import available_engines, example_int8_input, fastest_prepacked
from fxforge.pipeline.fragments import with_options
from helpers import reestimate_bn

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
TUNED = available_engines(("fbgemm", "onednn"))
needs_two_engines = pytest.mark.skipif(len(TUNED) < 2, reason="this torch build lacks fbgemm or onednn")


def test_the_engine_whose_kernel_is_faster_wins_whatever_the_order():
    def prepack(engine: str) -> SimpleNamespace:  # stands for a weight packed by that engine
        return SimpleNamespace(packed=engine)

    ran = []

    def kernel(x, packed, scale, zero_point):
        ran.append((packed, torch.backends.quantized.engine))

    def clock(fn) -> float:  # a fake clock: the slow engine's kernel takes 4 ms, the other 1 ms
        fn()
        return 4e-3 if ran[-1][0] == slow else 1e-3

    engines = available_engines(("fbgemm", "qnnpack", "onednn", "x86"))[:2]
    if len(engines) < 2:
        pytest.skip("needs two quantized engines")
    for slow in engines:
        for order in (engines, engines[::-1]):
            ran.clear()
            engine, packed = fastest_prepacked(kernel, prepack, order, torch.zeros(1), 0.1, 0, timer=clock)
            assert engine == packed.packed == next(e for e in engines if e != slow)
            assert {p for p, _ in ran} == set(engines)
            assert all(p == current for p, current in ran)  # each kernel ran under its own engine


def test_one_engine_or_no_example_input_is_not_timed():
    calls = []

    def kernel(*args):
        calls.append(args)

    assert fastest_prepacked(kernel, str.upper, ("qnnpack",), torch.zeros(1), 0.1, 0) == ("qnnpack", "QNNPACK")
    assert fastest_prepacked(kernel, str.upper, ("fbgemm", "qnnpack"), None, 0.1, 0) == ("fbgemm", "FBGEMM")
    assert calls == []


def test_example_input_has_the_shape_and_qparams_of_the_value_read():
    gm = fx.symbolic_trace(torch.nn.Identity())
    gm.register_buffer("s", torch.tensor(0.25))
    gm.register_buffer("z", torch.tensor(3))
    graph = gm.graph
    x = next(iter(graph.nodes))
    with graph.inserting_after(x):
        scale, zero_point = graph.get_attr("s"), graph.get_attr("z")
    with graph.inserting_after(zero_point):
        q = graph.call_function(torch.quantize_per_tensor, (x, scale, zero_point, torch.quint8))
    with graph.inserting_after(q):
        flat = graph.call_method("flatten", (q, 1))  # int8 pass-through: keeps q's qparams
    with graph.inserting_after(flat):
        dq = graph.call_method("dequantize", (flat,))
    assert example_int8_input(gm, dq) is None  # no shape recorded
    dq.meta["tensor_meta"] = type("TensorMeta", (), {"shape": torch.Size([2, 5, 3, 3])})()
    example = example_int8_input(gm, dq)
    assert example.shape == (2, 5, 3, 3) and example.dtype == torch.quint8
    assert (example.q_scale(), example.q_zero_point()) == (0.25, 3)
    assert example.is_contiguous(memory_format=torch.channels_last)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return reestimate_bn(toy_model(), batches(8, seed=100)).eval()


@needs_two_engines
def test_x86_packs_each_layer_for_a_measured_engine_and_agrees_with_fixed_packing():
    model, calibration = _model(), batches(8)
    tuned = fxforge.compile(model, "x86", example_inputs=X, calibration=calibration)
    fixed = fxforge.compile(model, "x86", example_inputs=X, calibration=calibration,
                            pipeline=with_options(fxforge.pipeline_for("x86"), "lower-x86", autotune=False))
    notes = next(p.notes for p in tuned.report.passes if p.name == "lower-x86")
    choice = next(n for n in notes if n.startswith("weights packed for the fastest engine"))
    chosen = {e: int(n) for n, e in (part.split() for part in choice.split(": ")[1].split(", "))}
    assert set(chosen) <= set(TUNED)
    # every conv/linear is measured, except conv+add: only oneDNN packs for conv2d_add
    weighted = sum(v for k, v in _lowered_counts(notes[0]).items()
                   if k.startswith(("conv", "linear")) and "+add" not in k)
    assert sum(chosen.values()) == weighted > 0
    assert not any("fastest engine" in n for p in fixed.report.passes for n in p.notes)
    for x in batches(3, seed=9):
        # engines compute the same integer op and requantize alike: outputs within one int8 step
        step = tuned.report.quantization.layers[-1].scale
        assert (tuned(x) - fixed(x)).abs().max() <= step * 1.01
    assert sqnr(model, tuned, X) >= 25


def _lowered_counts(note: str) -> dict[str, int]:
    """'int8 kernels (x86): 10 add, 3 conv2d' -> {'add': 10, 'conv2d': 3}"""
    return {kind: int(n) for n, kind in (part.split() for part in note.split(": ")[1].split(", "))}


@needs_two_engines
def test_layers_of_the_same_shapes_are_timed_once(monkeypatch):
    """resnet50 repeats its bottleneck blocks: timing each layer made lower-x86 take 0.9 s of a 2.2 s compile."""
    import fxforge.backends.int8_lowering as lowering

    timed = []

    def counting(kernel, prepack, engines, x, scale, zero_point):
        timed.append(prepack.shapes)
        return fastest_prepacked(kernel, prepack, engines, x, scale, zero_point)

    monkeypatch.setattr(lowering, "fastest_prepacked", counting)
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()]
    for _ in range(3):
        layers += [torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()]
    model = reestimate_bn(torch.nn.Sequential(*layers), batches(4, seed=100)).eval()
    compiled = fxforge.compile(model, "x86", example_inputs=X, calibration=batches(4))
    assert len(timed) == len(set(timed)) == 2  # the stem, and one of the three 8->8 convs
    notes = next(p.notes for p in compiled.report.passes if p.name == "lower-x86")
    choice = next(n for n in notes if n.startswith("weights packed for the fastest engine"))
    assert sum(int(part.split()[0]) for part in choice.split(": ")[1].split(", ")) == 4  # every conv has a choice
    assert sqnr(model, compiled, X) >= 25

"""Per-layer timed kernel choice for the fp32 "cpu" target (backends/fp32_kernel_choice.py, lower-cpu{autotune=true}).

Timing is never asserted: the choice mechanism is driven by fake timers."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends import fp32_kernel_choice as choice
from fxforge.backends.cpu import OneDnnConv2d, OneDnnLinear
from fxforge.backends.fp32_kernel_choice import GemmConv1x1, GemmLinear, fastest
from fxforge.graph.fused import FusedLinear
from fxforge.pipeline.fragments import with_options
from helpers import module_types, randomize_bn, rel_error

TUNED = with_options(fxforge.pipeline_for("cpu"), "lower-cpu", autotune=True)


class Net(nn.Module):
    """1x1 convs (plain, +relu, +add+relu, strided: not a GEMM), a depthwise conv, a token MLP and a head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw1, self.pw2 = nn.Conv2d(16, 24, 1), nn.Conv2d(24, 16, 1, bias=False)
        self.down = nn.Conv2d(16, 16, 1, stride=2)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.pw2(torch.relu(self.pw1(self.dw(y)))) + y)
        y = self.down(y)
        tokens = y.flatten(2).transpose(1, 2)  # [N, HW, C]
        tokens = self.fc2(torch.relu(self.fc1(tokens)))
        return self.head(tokens.mean(1)), y


def _model_and_input(batch=2):
    torch.manual_seed(0)
    return randomize_bn(Net()).eval(), torch.randn(batch, 3, 10, 10)


def _prefer(kinds):
    """A fake timer: candidates whose module is one of ``kinds`` take 1 s, the others 2 s (calls still run)."""
    def timer(fn: functools.partial) -> float:
        fn()
        return 1.0 if isinstance(fn.func, kinds) else 2.0
    return timer


def _compile(model, x, timer, monkeypatch):
    monkeypatch.setattr(choice, "seconds_per_call", timer)
    return fxforge.compile(model, "cpu", example_inputs=x, pipeline=TUNED)


def _notes(compiled):
    return next(p.notes for p in compiled.report.passes if p.name == "lower-cpu")


def test_fastest_picks_the_fastest_whatever_the_order_and_keeps_the_incumbent_on_a_small_lead():
    cost = {"a": 1.0, "b": 0.5, "c": 0.97}

    def timer(fn):  # each fake candidate returns its name: its cost key
        return cost[fn()]

    for order in (("a", "b", "c"), ("c", "b", "a")):
        name, seconds = fastest({k: (lambda k=k: k) for k in order}, timer)
        assert name == "b" and seconds == {k: cost[k] for k in order}
    # c is faster than the incumbent a, but by less than MARGIN: a stays
    assert fastest({"a": lambda: "a", "c": lambda: "c"}, timer)[0] == "a"


def test_candidates_are_warmed_up_then_timed_interleaved():
    order = []
    fastest({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, lambda fn: fn() or 1.0)
    warmup, rounds = choice.SCHEDULE.warmup, choice.SCHEDULE.rounds
    assert warmup >= 1 and order[:2 * warmup] == ["a"] * warmup + ["b"] * warmup
    assert order[2 * warmup:] == (["a", "b", "b", "a"] * rounds)[:2 * rounds]  # which goes first alternates


@pytest.mark.parametrize(("add", "activation"), [(False, a) for a in ("", "relu", "relu6", "hardswish", "silu")]
                         + [(True, ""), (True, "relu")])  # conv+add fuses with relu only
def test_gemm_conv_matches_onednn_and_returns_channels_last(add, activation):
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 20, 1).eval()
    x = torch.randn(2, 12, 5, 7)
    other = torch.randn(2, 20, 5, 7) if add else None
    onednn = OneDnnConv2d(conv, add, activation, list(x.shape))
    gemm = GemmConv1x1.of(onednn)
    args = (x, other) if add else (x,)
    with torch.inference_mode():
        expected, actual = onednn(*args), gemm(*args)
    assert rel_error(actual, expected) < 1e-5
    assert actual.shape == expected.shape and actual.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():  # an NCHW input (e.g. a graph input) gives the same values
        assert rel_error(gemm(x.contiguous(), *args[1:]), expected) < 1e-5


@pytest.mark.parametrize("shape", [(3, 16), (2, 7, 16)])
def test_gemm_linear_matches_eager(shape):
    torch.manual_seed(2)
    linear = nn.Linear(16, 9).eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        assert rel_error(GemmLinear(linear)(x), linear(x)) < 1e-5
        assert rel_error(GemmLinear(linear, "relu")(x), FusedLinear(linear, "relu")(x)) < 1e-5


def test_gemm_everywhere_it_applies_matches_eager(monkeypatch):
    model, x = _model_and_input()
    compiled = _compile(model, x, _prefer((GemmConv1x1, GemmLinear)), monkeypatch)
    types = module_types(compiled.graph_module)
    # pw1 (+relu), pw2 (+add+relu): GEMMs; stem, dw and the strided 1x1 stay on oneDNN
    assert types.count("GemmConv1x1") == 2 and types.count("OneDnnConv2d") == 3
    assert types.count("GemmLinear") == 3 and "Linear" not in types  # fc1 (+relu), fc2, head
    notes = _notes(compiled)
    assert any(n.startswith("kernels chosen by timing") and "5 gemm" in n for n in notes)
    assert sum(n.endswith("-> gemm") for n in notes) == 5
    with torch.inference_mode():
        for batch in (x, torch.randn(2, 3, 10, 10), torch.randn(1, 3, 10, 10)):
            out, feat = compiled(batch)
            ref_out, ref_feat = model(batch)
            assert rel_error(out, ref_out) < 1e-4 and rel_error(feat, ref_feat) < 1e-4
            assert feat.is_contiguous()  # eager's layout at the output, as without the choice


def test_prepacked_onednn_linear_can_win_for_plain_linears(monkeypatch):
    model, x = _model_and_input()
    compiled = _compile(model, x, _prefer((OneDnnConv2d, OneDnnLinear)), monkeypatch)
    types = module_types(compiled.graph_module)
    assert "GemmConv1x1" not in types and "GemmLinear" not in types
    assert types.count("OneDnnLinear") == 3  # fc1 (fused relu) as lowered; fc2 and head: prepacked
    with torch.inference_mode():
        assert rel_error(compiled(x)[0], model(x)[0]) < 1e-4


def test_incumbents_kept_when_nothing_is_faster_and_default_is_untimed(monkeypatch):
    model, x = _model_and_input()
    calls = []

    def slow_alternatives(fn):
        calls.append(type(fn.func).__name__)
        fn()
        return 1.0 if isinstance(fn.func, (OneDnnConv2d, OneDnnLinear)) or type(fn.func) is nn.Linear else 2.0

    kept = _compile(model, x, slow_alternatives, monkeypatch)
    assert {"GemmConv1x1", "GemmLinear", "OneDnnConv2d", "OneDnnLinear", "Linear"} <= set(calls)  # it measured
    assert not any(n.startswith("  ") for n in _notes(kept))  # no layer switched
    calls.clear()
    default = fxforge.compile(model, "cpu", example_inputs=x)  # autotune off: nothing timed
    assert calls == [] and not any("chosen by timing" in n for n in _notes(default))
    assert module_types(kept.graph_module) == module_types(default.graph_module)
    with torch.inference_mode():
        assert torch.equal(kept(x)[0], default(x)[0])


def test_layers_with_the_same_signature_share_one_measurement(monkeypatch):
    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    timed = []

    def timer(fn):
        timed.append(fn.func)
        fn()
        return 1.0

    model, x = Twins().eval(), torch.randn(3, 8)
    _compile(model, x, timer, monkeypatch)
    per_measurement = 3 * choice.SCHEDULE.rounds  # eager, onednn, gemm
    assert len(timed) == 2 * per_measurement  # a and b share one; c has its own


def test_compiled_model_with_gemm_kernels_copies_and_pickles(monkeypatch):
    model, x = _model_and_input()
    compiled = _compile(model, x, _prefer((GemmConv1x1, GemmLinear)), monkeypatch)
    buffer = io.BytesIO()
    torch.save(compiled.graph_module, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(compiled.graph_module), torch.load(buffer, weights_only=False)):
        with torch.inference_mode():
            assert rel_error(clone(x)[0], model(x)[0]) < 1e-4

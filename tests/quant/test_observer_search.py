"""search-observers: per layer, the observer / weight scheme with the best local SQNR on the calibration data.

The test model is a conv pair that cross-layer equalization would fix: conv1's channel 0 has 40x weights and a
large positive bias (an outlier weight row and an outlier activation channel), and conv2 reads that channel
with weights / 40, so the function is an ordinary one. Per-tensor min-max int8 spends its levels on the
outliers and leaves the other channels a handful; per-channel weights and a clipped activation range fix it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxforge
from fxforge.errors import ConfigError
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
CPU_INT8 = [t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()]
pytestmark = pytest.mark.skipif(not CPU_INT8, reason="no int8 engine in this torch build")
SEARCH = {"after:calibrate": "search-observers"}
MINMAX_PER_TENSOR = fxforge.QuantConfig(activation="minmax", per_channel=False)


class OutlierNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def outlier_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = OutlierNet().eval()
    with torch.no_grad():
        model.conv1.weight[0] *= 40
        model.conv1.bias[0] = model.conv1.bias[0].abs() * 40 + 2
        model.conv2.weight[:, 0] /= 40
    return model


def data() -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(8)], torch.randn(256, 3, 8, 8, generator=g)


def compile_with(model: nn.Module, target: str, search: bool | str | list, calibration, config=None, **kwargs):
    extra = ({"after:calibrate": search} if isinstance(search, (str, list)) else SEARCH) if search else None
    return fxforge.compile(model, target, example_inputs=torch.randn(4, 3, 8, 8, generator=torch.Generator()
                                                                      .manual_seed(3)),
                           calibration=calibration, quant_config=config, extra_passes=extra, **kwargs)


def record(compiled: fxforge.CompiledModule, layer: str):
    return next(r for r in compiled.report.quantization.layers if r.layer == layer)


@pytest.mark.parametrize("target", CPU_INT8)
def test_search_fixes_the_outlier_layer_and_the_output(target):
    model, (calibration, held_out) = outlier_net(), data()
    with torch.no_grad():
        expected = model(held_out)
        plain = compile_with(model, target, False, calibration, MINMAX_PER_TENSOR)
        searched = compile_with(model, target, True, calibration, MINMAX_PER_TENSOR)
        sqnr = {name: outputs_sqnr_db(expected, m(held_out)) for name, m in (("plain", plain), ("searched", searched))}
    conv1 = record(searched, "conv1")
    assert conv1.search.startswith("minmax, per-tensor weights -> ")
    chosen = conv1.search.split(" -> ")[1]
    assert "per-channel weights" in chosen and not chosen.startswith("minmax")  # clipped range, per-channel
    assert "per-channel" in conv1.weight and conv1.observer != "minmax"  # what insert-qdq then did
    assert conv1.search_gain_db > 1.0  # measured 2.1-5.1 dB (seeds 0-2, all targets)
    assert sqnr["searched"] > sqnr["plain"] + 1.5, sqnr  # measured +2.4 to +5.2 dB (seeds 0-2, all targets)
    assert record(plain, "conv1").search_gain_db is None and not plain.report.quantization.search


@pytest.mark.parametrize("config", [None, MINMAX_PER_TENSOR], ids=["default", "minmax-per-tensor"])
def test_no_layer_is_worse_than_its_configured_choice(config):
    model, (calibration, held_out) = outlier_net(1), data()
    target = CPU_INT8[0]
    with torch.no_grad():
        expected = model(held_out)
        plain = compile_with(model, target, False, calibration, config)
        searched = compile_with(model, target, True, calibration, config)
        gain = outputs_sqnr_db(expected, searched(held_out)) - outputs_sqnr_db(expected, plain(held_out))
    notes = next(p.notes for p in searched.report.passes if p.name == "search-observers")
    assert notes[0].startswith("observer search on 8 calibration batches")
    layers = [r for r in searched.report.quantization.layers if r.search_gain_db is not None]
    assert {r.layer for r in layers} >= {"conv1", "conv2", "fc"}
    for r in layers:  # kept choice vs configured one, measured by the search on the calibration data
        assert r.search_gain_db >= 0.0, r
        assert (r.search_gain_db == 0.0) == (" -> " not in r.search), r
    assert gain > -0.25  # the output is not made worse either (measured +0.0 to +5 dB)


def test_search_measures_what_the_report_measures():
    """With a gain threshold nothing can reach, every configured choice is kept: the qparams and outputs are
    those of the plain compile, and the search's SQNR of each layer equals insert-qdq's local SQNR (same data:
    a generator is read once by calibrate, so the search runs on the 4 example inputs, as the report does)."""
    model, (calibration, _) = outlier_net(), data()
    target = CPU_INT8[0]
    plain = compile_with(model, target, False, iter(calibration))
    kept = compile_with(model, target, "search-observers{min_gain_db=1000}", iter(calibration))
    buffers = dict(plain.graph_module.named_buffers())
    for name, value in kept.graph_module.named_buffers():
        if name.startswith("act_"):
            assert torch.equal(value, buffers[name]), name
    x = torch.randn(16, 3, 8, 8)
    assert torch.equal(plain(x), kept(x))
    assert "the example inputs" in kept.report.quantization.search
    for r in kept.report.quantization.layers:
        if r.local_sqnr_db is not None:
            assert r.search == f"{r.observer}, per-channel weights"
            assert r.search_gain_db == 0.0
    result = _search_records(model, target, calibration)
    for r in plain.report.quantization.layers:
        if r.local_sqnr_db is not None:
            assert result[r.node].default_db == pytest.approx(r.local_sqnr_db, abs=0.05), r.layer


def _search_records(model: nn.Module, target: str, calibration) -> dict:
    """The search's records (kept by a recording pass placed right after it)."""
    found = {}

    @fxforge.graph_pass(name="keep-search-records-for-test")
    def keep(gm, ctx):
        found.update({r.node: r for r in ctx.artifacts["observer_search"][0].records})
        return False

    compile_with(model, target, ["search-observers{min_gain_db=1000}", keep], iter(calibration))
    return found


@pytest.mark.parametrize("target", CPU_INT8)
def test_every_cpu_target_saves_and_loads_with_identical_outputs(target, tmp_path):
    model, (calibration, held_out) = outlier_net(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    searched = compile_with(model, target, True, calibration)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched
    path = fxforge.save(searched, tmp_path / "searched.fxf")
    loaded = fxforge.load(path)
    with torch.no_grad():
        assert torch.equal(searched(held_out), loaded(held_out))
    assert loaded.report.quantization.search == searched.report.quantization.search


def test_recalibrate_keeps_the_searched_observers():
    model, (calibration, held_out) = outlier_net(), data()
    searched = compile_with(model, CPU_INT8[0], True, calibration, MINMAX_PER_TENSOR)
    kinds = {type(m).__name__ for name, m in searched.observed_graph.named_children() if name.startswith("observer")}
    assert kinds - {"MinMaxObserver"}  # some group now uses a clipping observer
    fxforge.recalibrate(searched, calibration)
    with torch.no_grad():
        assert outputs_sqnr_db(model(held_out), searched(held_out)) > 5


def test_html_report_has_the_search_column(tmp_path):
    searched = compile_with(outlier_net(), CPU_INT8[0], True, data()[0])
    page = searched.report.to_html(tmp_path / "report.html", graphs=False).read_text()
    assert "observer search (gain in own dB)" in page
    assert "observer search on 8 calibration batches" in page
    assert "[search: +" in str(searched.report)


@pytest.mark.parametrize("options", ["activations=median", "weights=per-row", "batches=0", "activations=percentile:20"])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError, match="search-observers"):
        fxforge.PassManager.from_text(f"search-observers{{{options}}}")


def test_search_before_calibration_is_refused_with_the_fix():
    with pytest.raises(fxforge.errors.PassError, match="'calibrated' is provided by calibrate"):
        fxforge.compile(outlier_net(), CPU_INT8[0], example_inputs=torch.randn(2, 3, 8, 8), calibration=data()[0],
                        extra_passes={"before:calibrate": "search-observers"})


class Branchy(nn.Module):
    """cat (one qparam group for several values), a residual add, average pooling (requantized), a layer
    called twice (one weight for both calls: its scheme is not searched) and a conv-transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        y = torch.relu(self.shared(y) + y)
        y = nn.functional.avg_pool2d(self.shared(y), 2)
        return self.up(y)


@pytest.mark.parametrize("target", CPU_INT8)
def test_graph_shapes_the_search_meets(target):
    torch.manual_seed(0)
    model = Branchy().eval()
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        plain = fxforge.compile(model, target, example_inputs=x, calibration=calibration)
        searched = fxforge.compile(model, target, example_inputs=x, calibration=calibration, extra_passes=SEARCH)
        gain = outputs_sqnr_db(expected, searched(x)) - outputs_sqnr_db(expected, plain(x))
    layers = {r.layer: r for r in searched.report.quantization.layers if r.search_gain_db is not None}
    assert {"a", "b", "up"} <= set(layers)
    assert all(r.search_gain_db >= 0 for r in layers.values())
    shared = [r for r in searched.report.quantization.layers if r.layer == "shared"]
    assert shared and all("per-channel" in r.weight for r in shared)  # one weight for both calls: configured
    assert gain > -1.0  # measured -0.1 to +0.9 dB


def test_a_qat_model_keeps_its_trained_qparams_and_weight_scheme():
    model, (calibration, held_out) = outlier_net(), data()
    target = CPU_INT8[0]
    qat = fxforge.prepare_qat(model, target, example_inputs=calibration[0])
    with torch.no_grad():
        for batch in calibration:  # observe: the fake-quants learn their ranges
            qat(batch)
    qat.eval()
    plain = fxforge.compile(qat, target, example_inputs=calibration[0])
    searched = fxforge.compile(qat, target, example_inputs=calibration[0], calibration=calibration,
                               extra_passes=SEARCH)
    assert ": 0 of " in searched.report.quantization.search  # nothing to choose: every point was trained
    with torch.no_grad():
        assert torch.equal(plain(held_out), searched(held_out))


@pytest.mark.parametrize("noise", [math.nan, math.inf])
def test_a_non_finite_candidate_scores_below_every_finite_one(noise):
    from fxforge.quant.search import _db

    assert _db(1.0, noise) == -math.inf
    assert _db(1.0, noise) < _db(1.0, 1e6)

"""The "cpu-bf16" target: availability, pipeline, lowered graph, fp32 boundary, SQNR against fp32, artifacts.

On CPUs without AMX / AVX512-BF16 the target is unavailable; the tests that compile use the documented
testing override (FXFORGE_CPU_BF16_EMULATE=1). Where oneDNN also refuses bf16 (AVX2 CPUs) the lowered modules
then run eager bf16 ops on the same bf16 weights: the graph and the numerics are tested, oneDNN's prepacked
bf16 weights only where the CPU has them.
"""

import copy

import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends.cpu_bf16 import (
    EMULATE_ENV,
    OneDnnConv2dBf16,
    OneDnnLinearBf16,
    bf16_unavailable_reason,
    native_bf16_kernels,
)
from fxforge.pipeline.fragments import compose
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import assert_unchanged, module_types, one_intra_op_thread, randomize_bn, state_snapshot

_threads = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "1")


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    if bf16_unavailable_reason() is None:
        pytest.skip("this CPU runs bf16 natively")


class ConvNet(nn.Module):
    """conv+bn+relu, a residual conv+add+relu, a 4-d output, a linear+relu and a plain linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.hidden, self.head = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.conv(y) + y)
        z = torch.relu(self.hidden(y.mean((2, 3))))
        return self.head(z), y


def _model():
    return randomize_bn(ConvNet()).eval()


# ---------------------------------------------------------------------------------------------- target
def test_unavailable_without_bf16_hardware_says_what_is_missing_and_what_to_use(no_override):
    assert "cpu-bf16" not in fxforge.targets()
    with pytest.raises(fxforge.BackendUnavailableError,
                       match=r"neither AMX nor AVX512-BF16.*use 'cpu' \(fp32\) or 'x86' \(int8\).*Usable here: cpu"):
        fxforge.compile(_model(), "cpu-bf16", example_inputs=torch.randn(1, 3, 8, 8))


def test_override_makes_the_target_usable(emulate):
    assert "cpu-bf16" in fxforge.targets()


def test_pipeline_is_the_cpu_pipeline_with_the_bf16_lowering():
    text = fxforge.pipeline_for("cpu-bf16")  # works whether or not this CPU can run it
    assert text == compose("cpu-graph", "lower-cpu-bf16")  # the cpu target's graph passes, shared
    assert fxforge.pipeline_for("cpu") == compose("cpu-graph", "lower-cpu")
    assert text.endswith(",lower-cpu-bf16")
    assert fxforge.PassManager.from_text(text).pipeline == text


# ---------------------------------------------------------------------------------------------- graph
def test_lowered_graph_holds_bf16_weights_and_casts_at_the_edges(emulate):
    compiled = fxforge.compile(_model(), "cpu-bf16", example_inputs=torch.randn(2, 3, 16, 16))
    gm = compiled.graph_module
    assert module_types(gm) == ["OneDnnConv2dBf16", "OneDnnConv2dBf16", "OneDnnLinearBf16", "OneDnnLinearBf16"]
    floating = [t for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()]
    assert floating and all(t.dtype == torch.bfloat16 for t in floating)
    nodes = list(gm.graph.nodes)
    first_cast = nodes[1]  # straight to channels-last: only to-nhwc's conversion into it reads the input
    assert (first_cast.op, first_cast.target) == ("call_method", "to") and first_cast.args == (nodes[0],)
    assert first_cast.kwargs == {"dtype": torch.bfloat16, "memory_format": torch.channels_last}
    output = nodes[-1]
    casts = [a for a in output.args[0] if a.op == "call_method" and a.target in ("to", "contiguous")]
    assert len(casts) == 2  # both outputs come back through a cast to fp32
    assert "lowered 2 conv(s) and 2 linear(s)" in str(compiled.report)


def test_weights_are_prepacked_where_onednn_runs_bf16(emulate):
    compiled = fxforge.compile(_model(), "cpu-bf16", example_inputs=torch.randn(2, 3, 16, 16))
    lowered = [m for m in compiled.graph_module.modules() if isinstance(m, (OneDnnConv2dBf16, OneDnnLinearBf16))]
    assert len(lowered) == 4
    for m in lowered:
        assert m.weight.dtype == torch.bfloat16 and m.native == native_bf16_kernels()
        if m.native:  # an opaque oneDNN tensor, built once here
            assert m.packed_weight.is_mkldnn and m.packed_weight.dtype == torch.bfloat16
        else:  # emulated: eager bf16 ops on the dense bf16 weight
            assert m.packed_weight is m.weight
            assert "emulated" in repr(m)


# ---------------------------------------------------------------------------------------------- numerics
def test_outputs_are_fp32_in_eager_layout_and_close_to_fp32(emulate):
    model, x = _model(), torch.randn(2, 3, 16, 16)
    snapshot = state_snapshot(model)
    compiled = fxforge.compile(model, "cpu-bf16", example_inputs=x)
    assert_unchanged(model, snapshot)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for inputs in (x, torch.randn(1, 3, 16, 16), x.bfloat16()):  # other batch size; bf16 passes the input cast
        logits, feat = compiled(inputs)
        assert logits.dtype == feat.dtype == torch.float32
        assert feat.is_contiguous()
        assert outputs_sqnr_db(model(inputs.float()), (logits, feat)) > 30


def test_report_gives_the_output_sqnr_against_fp32(emulate, tmp_path):
    model, x = _model(), torch.randn(2, 3, 16, 16)
    compiled = fxforge.compile(model, "cpu-bf16", example_inputs=x)
    measured = outputs_sqnr_db(model(x), compiled(x))
    assert compiled.report.output_sqnr_db == pytest.approx(measured, abs=0.01)
    assert f"output SQNR vs fp32 on the example inputs: {measured:.1f} dB" in str(compiled.report)
    assert compiled.report.to_dict()["output_sqnr_db"] == compiled.report.output_sqnr_db
    html = compiled.report.to_html(tmp_path / "report.html", graphs=False).read_text()
    assert f"{measured:.1f} dB against fp32" in html
    # fp32 targets have no such line: their error is the relative one
    assert fxforge.compile(model, "cpu", example_inputs=x).report.output_sqnr_db is None


def test_numeric_verification_compares_by_sqnr(emulate):
    compiled = fxforge.compile(_model(), "cpu-bf16", example_inputs=torch.randn(2, 3, 16, 16), verify="numeric")
    assert compiled.report.max_rel_error > 1e-4  # bf16 rounding: a fp32 tolerance would have rejected it


@pytest.mark.slow
def test_resnet18_sqnr_against_fp32_matches_eager_bf16(emulate):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = fxforge.testing.reestimate_bn(torchvision.models.resnet18(), [torch.randn(8, 3, 64, 64)
                                                                          for _ in range(4)])
    x = torch.randn(2, 3, 64, 64)
    compiled = fxforge.compile(model, "cpu-bf16", example_inputs=x)
    with torch.inference_mode():
        reference = model(x)
        eager_bf16 = outputs_sqnr_db(reference, copy.deepcopy(model).bfloat16()(x.bfloat16()))
        sqnr = outputs_sqnr_db(reference, compiled(x))
    print(f"resnet18 64x64: cpu-bf16 {sqnr:.1f} dB, eager model.bfloat16() {eager_bf16:.1f} dB")
    assert sqnr >= 30 and sqnr >= eager_bf16 - 3  # bf16 keeps 8 mantissa bits: ~40 dB per op, less accumulated


class Encoder(nn.Module):
    """A ViT encoder block: nn.MultiheadAttention goes through attention-to-sdpa, then everything runs in bf16."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_attention_block_runs_in_bf16(emulate):
    model, x = Encoder().eval(), torch.randn(2, 7, 32)
    compiled = fxforge.compile(model, "cpu-bf16", example_inputs=x)
    types = module_types(compiled.graph_module)
    assert "SdpaSelfAttention" in types and "MultiheadAttention" not in types
    assert types.count("OneDnnLinearBf16") == 2  # the feed-forward layers
    attention = next(m for m in compiled.graph_module.modules() if type(m).__name__ == "SdpaSelfAttention")
    assert isinstance(attention.out_proj, OneDnnLinearBf16)  # called inside the module, lowered all the same
    assert attention.in_proj_weight.dtype == torch.bfloat16
    y = compiled(x)
    assert y.dtype == torch.float32 and outputs_sqnr_db(model(x), y) > 30


# ---------------------------------------------------------------------------------------------- artifacts
def test_save_load_round_trip(emulate, tmp_path, monkeypatch):
    model, x = _model(), torch.randn(2, 3, 16, 16)
    compiled = fxforge.compile(model, "cpu-bf16", example_inputs=x)
    path = fxforge.save(compiled, tmp_path / "m.fxf")
    meta = fxforge.read_metadata(path)
    assert (meta["target"], meta["engine"]) == ("cpu-bf16", "onednn")
    loaded = fxforge.load(path)
    assert loaded.target == "cpu-bf16" and loaded.report.output_sqnr_db == compiled.report.output_sqnr_db
    for got, want in zip(loaded(x), compiled(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for clone in (copy.deepcopy(compiled),):
        torch.testing.assert_close(clone(x), compiled(x), rtol=0, atol=0)
    monkeypatch.delenv(EMULATE_ENV)
    if bf16_unavailable_reason() is not None:  # a bf16 model does not load where the target cannot run
        with pytest.raises(fxforge.BackendUnavailableError, match="compiled for target 'cpu-bf16'"):
            fxforge.load(path)


def test_torchscript_export_reproduces_the_compiled_model(emulate):
    x = torch.randn(2, 3, 16, 16)
    compiled = fxforge.compile(_model(), "cpu-bf16", example_inputs=x)
    scripted = compiled.to_torchscript()  # checks itself against the compiled model, bit for bit
    for got, want in zip(scripted(x), compiled(x), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)

"""Regression tests of the quantization core: aliasing, ops without quantized kernels, QAT
conversion fidelity, per-layer settings in prepare_qat, skip of merged modules, calibration items."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import reference_pipeline, sqnr
from torch import nn

import fxforge
from fxforge.quant import qspec

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def calibration(n: int = 4, shape: tuple[int, ...] = (2, 3, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def compile_static(model: nn.Module, x: torch.Tensor | tuple = X, target: str = "x86", **kwargs
                   ) -> fxforge.CompiledModule:
    if "calibration" not in kwargs:
        kwargs["calibration"] = calibration(shape=tuple(x.shape))
    kwargs.setdefault("pipeline", reference_pipeline(target))  # these tests check the reference int8 graph
    return fxforge.compile(model.eval(), target, example_inputs=x, **kwargs)


# ------------------------------------------------------------------------------- values changed in place


class MutatedAfterUse(nn.Module):
    """``y`` is read by conv2, then changed in place, then read again (a view of it is returned)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        z = self.conv2(y)
        y.add_(1)
        return z, torch.flatten(y, 1)


def test_a_value_changed_in_place_is_seen_changed_by_every_later_reader():
    torch.manual_seed(0)
    model = MutatedAfterUse().eval()
    compiled = compile_static(model)
    with torch.inference_mode():
        (_, expected), (_, got) = model(X.clone()), compiled(X.clone())
    assert (got - expected).abs().max() < 0.1  # was off by the whole +1: flatten read the quantized copy


# ------------------------------------------------------------------------- ops torch has no int8 kernel for


class ConvThen(nn.Module):
    def __init__(self, dims: int, middle: nn.Module) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.a, self.middle, self.b = conv(3, 4, 1), middle, conv(4, 4, 1)

    def forward(self, x):
        return self.b(self.middle(self.a(x)))


class Interpolate1d(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2)


@pytest.mark.parametrize(("dims", "middle"), [
    (2, nn.AdaptiveMaxPool2d(2)), (1, nn.Upsample(scale_factor=2)), (1, Interpolate1d())],
    ids=["adaptive-max-pool2d", "upsample-1d", "interpolate-1d"])
def test_value_picking_ops_without_quantized_kernels_compile_and_keep_qparams(dims, middle):
    torch.manual_seed(0)
    model = ConvThen(dims, middle).eval()
    x = torch.randn((2, 3, 8) if dims == 1 else (2, 3, 8, 8))
    compiled = compile_static(model, x)
    assert sqnr(model, compiled, x) > 25
    middle_node = next(n for n in compiled.graph_module.graph.nodes
                       if n.target == "middle" or n.target is F.interpolate)
    assert middle_node.args[0].target == "dequantize"  # runs in fp32 on the dequantized values
    requant = next(iter(middle_node.users))
    assert requant.target is torch.quantize_per_tensor
    assert requant.args[1].target == middle_node.args[0].args[0].args[1].target  # the input's qparams


# ---------------------------------------------------------------------------------------------- QAT


class QatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.c2(y) + y
        return self.fc(torch.flatten(F.max_pool2d(y, 2), 1))


def trained_qat(target: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    qat = fxforge.prepare_qat(QatNet(), target, example_inputs=X, **kwargs)
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(20):
        loss = qat(torch.randn(8, 3, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat.eval()


def test_compiled_qat_model_reproduces_its_eval_output_without_vnni(monkeypatch):
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)  # fbgemm/x86 use reduce_range on such CPUs
    qat = trained_qat("x86")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 3  # beyond the trained ranges
    compiled = fxforge.compile(qat, "x86", example_inputs=x, pipeline=reference_pipeline("x86"))
    assert compiled.report.quantization.reduce_range
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-4, atol=1e-5)


def test_without_vnni_static_int8_narrows_weights_and_dynamic_int8_activations(monkeypatch):
    """No VNNI: u8 x s8 pair sums saturate int16 unless 2 * max|activation code| * max|weight code| fits. Static
    int8 keeps 8-bit activations (codes up to 255 even beyond the calibrated range) and uses weights in
    [-64, 63]; dynamic int8 quantizes activations per call to 7 bits and keeps 8-bit weights."""
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(4, 3, 8, 8)
    static = fxforge.compile(model, "fbgemm", example_inputs=x, calibration=[x],
                             pipeline=reference_pipeline("fbgemm"))
    summary = static.report.quantization
    assert summary.reduce_range and {r.activation for r in summary.layers} == {"quint8[0,255] per-tensor affine"}
    layers = [m for m in static.graph_module.modules() if hasattr(m, "weight_scale")]
    assert len(layers) == 2
    for layer in layers:
        codes = (layer.weight / layer.weight_scale.view(-1, *[1] * (layer.weight.dim() - 1))).round()
        assert codes.min() >= -64 and codes.max() <= 63 and codes.abs().max() >= 63  # the 7-bit grid, used fully
    dynamic = fxforge.compile(model, "fbgemm", example_inputs=x, quantization="dynamic")
    weights = {r.weight for r in dynamic.report.quantization.layers}
    assert dynamic.report.quantization.reduce_range and weights == {"qint8[-128,127] per-channel(axis=0) symmetric"}


def test_prepare_qat_follows_per_channel_setting_and_compile_reproduces_it():
    config = fxforge.QuantConfig(per_channel=False).for_name("fc", per_channel=True)
    qat = trained_qat("qnnpack", quant_config=config)
    specs = {name: m.weight_spec for name, m in qat.named_modules() if hasattr(m, "weight_spec")}
    assert specs["c1"].axis is None and specs["c2"].axis is None and specs["fc"].axis == 0
    x = torch.randn(8, 3, 8, 8)
    compiled = fxforge.compile(qat, "qnnpack", example_inputs=x, quant_config=config,
                               pipeline=reference_pipeline("qnnpack"))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-4, atol=1e-5)


class PooledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


def test_qat_simulates_the_requantization_after_average_pooling():
    torch.manual_seed(0)
    qat = fxforge.prepare_qat(PooledNet(), "qnnpack", example_inputs=X)
    for _ in range(5):
        qat(torch.randn(8, 3, 8, 8))
    qat.eval()
    assert any(type(m).__name__ == "SharedFakeQuantize" for m in qat.modules())
    x = torch.randn(8, 3, 8, 8)
    compiled = fxforge.compile(qat, "qnnpack", example_inputs=x,  # requantizes the pooled value
                               pipeline=reference_pipeline("qnnpack"))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- skip


def seq_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Sigmoid(),
                         nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()


@pytest.mark.parametrize("merged", ["1", "2"], ids=["batchnorm-folded-into-conv", "relu-fused-into-conv"])
def test_skip_of_a_module_merged_into_another_op_is_an_error_not_a_silent_no_op(merged):
    with pytest.raises(fxforge.ConfigError, match=f"skip '{merged}'.*folded or fused"):
        compile_static(seq_model(), skip=[merged])


def test_skip_of_a_rewritten_relu_keeps_it_in_fp32():
    compiled = compile_static(seq_model(), skip=["5"])  # nn.ReLU after a sigmoid: normalize-relu rewrites it
    relu = next(n for n in compiled.graph_module.graph.nodes if n.target is torch.relu)
    assert relu.args[0].target == "dequantize"
    assert any("relu" in island and "skipped" in island for island in compiled.report.quantization.islands)


# ------------------------------------------------------------------------------------- calibration items


class WithFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, return_features: bool = False):
        y = self.conv(x)
        return (y, x) if return_features else y


def test_calibration_labels_are_not_fed_to_arguments_bound_at_compile_time():
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    compiled = compile_static(WithFlag(), calibration=loader)
    assert compiled.report.quantization.calibration_batches == 4
    assert fxforge.recalibrate(compiled, loader)  # the kept observed graph knows its inputs too


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_calibration_items_may_be_dicts_of_forward_arguments():
    items = [{"x": x, "y": -x, "label": 0, "names": ["a", "b"]} for x in calibration()]
    compiled = compile_static(TwoInputs(), (X, X), calibration=items)
    assert compiled.report.quantization.calibration_batches == 4
    calibrate = next(p for p in compiled.report.passes if p.name == "calibrate")
    assert any("ignored" in note for note in calibrate.notes)


def test_calibration_items_that_do_not_fit_the_model_raise_calibration_errors():
    with pytest.raises(fxforge.CalibrationError, match="1 value.*2 inputs.*x, y"):
        compile_static(TwoInputs(), (X, X), calibration=calibration())
    with pytest.raises(fxforge.CalibrationError, match="no value for 'y'"):
        compile_static(TwoInputs(), (X, X), calibration=[{"x": X}])
    with pytest.raises(fxforge.CalibrationError, match="calibration batch 0 .*RuntimeError"):
        compile_static(TwoInputs(), (X, X), calibration=[(torch.randn(2, 5, 8, 8), X)])


# ------------------------------------------------------------------------------------------ dynamic


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_dynamic_modes_follow_the_per_channel_setting(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LSTM(16, 8, batch_first=True)).eval()
    config = fxforge.QuantConfig(per_channel=False)
    compiled = fxforge.compile(model, "x86", example_inputs=torch.randn(2, 5, 8), quantization=mode,
                               quant_config=config, pipeline=reference_pipeline("x86", mode))
    assert compiled.graph_module.get_submodule("0").weight_scale.numel() == 1
    assert all("per-tensor" in r.weight for r in compiled.report.quantization.layers)


# ------------------------------------------------------------------------------------ argument checks


class ConvFc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(256, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_skip_given_as_one_string_names_one_module():
    compiled = compile_static(ConvFc(), skip="fc")  # not the modules 'f' and 'c'
    assert compiled.report.quantization.skipped == ["fc"]
    qat = fxforge.prepare_qat(ConvFc(), "x86", example_inputs=X, skip="fc")
    assert type(qat.get_submodule("fc")) is nn.Linear


def test_calibration_batches_is_checked_like_the_other_quantization_arguments():
    with pytest.raises(fxforge.CalibrationError, match="calibration_batches=2.5"):
        compile_static(ConvFc(), calibration_batches=2.5)
    with pytest.raises(fxforge.ConfigError, match="int8 target"):
        fxforge.compile(ConvFc().eval(), "cpu", example_inputs=X, calibration_batches=4)

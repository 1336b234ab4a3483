"""lower-x86 / lower-fbgemm / lower-qnnpack around torch's int8 kernel bugs (backends/int8_lowering.py): each
case a minimal model the graph fuzzer or the zoo sweep found; its docstring says what went wrong and the fix.
Checked by SQNR against eager (the models are one or two quantization points deep: ~35 dB at 7 bits, ~41 dB at
8 bits, so 20 dB catches a wrong kernel) and by which form the op was lowered to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import compile_calibrated_on, compile_reference
from torch import fx, nn

import fxforge
from fxforge.backends.int8_packed import PackedWeight
from fxforge.quant import qspec
from helpers import one_intra_op_thread, randomize_bn

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)

ENGINES = ["x86", "fbgemm", "qnnpack"]
SQNR_FLOOR_DB = 20.0


def _targets_of(gm: fx.GraphModule) -> list[str]:
    return [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op != "placeholder"]


def _pools_on_int8(gm: fx.GraphModule) -> bool:
    """Whether the pooling module reads an int8 tensor (not a dequantized one)."""
    pool = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                    nn.AvgPool2d))
    return not (pool.args[0].op == "call_method" and pool.args[0].target == "dequantize")


@pytest.mark.parametrize("pool", [nn.MaxPool2d(1, stride=2), nn.AvgPool2d(1), nn.MaxPool2d((1, 1))],
                         ids=["max-1x1-stride-2", "avg-1x1", "max-(1,1)"])
def test_qnnpack_pooling_over_one_element_windows_runs(pool: nn.Module):
    """qnnpack's int8 pooling kernels reject one-element windows ("1x1 pooling is meaningless": an internal
    assert at run time). Fix: max pooling over one element (a strided subsampling) is a ``share`` op in the
    op table (dequantize -> pool -> quantize with the input's qparams, exact), and lower-qnnpack leaves
    average pooling over one element in that reference form."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1), pool).eval()
    _, db = compile_calibrated_on(model, "qnnpack", torch.randn(3, 4, 5, 6))
    assert db >= SQNR_FLOOR_DB


@pytest.mark.parametrize("target", ENGINES)
def test_adaptive_average_pooling_of_a_1x1_map_to_a_larger_one_stays_in_reference_form(target: str):
    """torch's int8 adaptive_avg_pool2d is wrong when it upsamples a 1x1 map (N > 1, C > 1: off by whole
    input ranges, SQNR -2.5 dB; 1x1 maps are NCHW and channels-last at once). Fix: lower-<engine> leaves
    such pooling in its reference form."""
    class MeanThenUpsample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.conv(x).mean((2, 3), keepdim=True))  # an NCHW-strided 1x1 map

    compiled, db = compile_calibrated_on(MeanThenUpsample().eval(), target, torch.randn(3, 8, 7, 6))
    assert db >= SQNR_FLOOR_DB
    assert "conv2d" in " ".join(_targets_of(compiled.graph_module))  # the conv still runs on its int8 kernel


class BnPoolRelu6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = randomize_bn(nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveMaxPool2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.pool(self.bn(x)))


def test_qnnpack_relu6_reads_an_nchw_int8_tensor():
    """qnnpack's int8 clamp (relu6, hardtanh, clamp) misreads channels-last tensors, which int8 kernels
    return (here batch norm, then a max-pool in fp32 that keeps the layout): SQNR 1.2 dB. Fix: insert-qdq
    gives every int8 clamp an NCHW-contiguous input, which the lowered kernels then feed."""
    compiled, db = compile_calibrated_on(BnPoolRelu6().eval(), "qnnpack", torch.randn(3, 8, 1, 5))
    assert db >= SQNR_FLOOR_DB
    assert "batch_norm2d" in _targets_of(compiled.graph_module)


class ConvView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y.view(y.shape[0], -1), y


@pytest.mark.parametrize("target", ENGINES)
def test_view_of_an_int8_conv_output_runs(target: str):
    """int8 kernels return channels-last tensors, on which ``.view`` fails: the compile failed on its own
    example ("view size is not compatible with input tensor's size and stride"). Fix: lower-<engine>
    restores eager's NCHW layout before ``.view`` (as lower-cpu does)."""
    _, db = compile_calibrated_on(ConvView().eval(), target, torch.randn(3, 3, 6, 7))
    assert db >= SQNR_FLOOR_DB


@pytest.mark.parametrize("target", ENGINES)
def test_outputs_keep_eager_layout(target: str):
    """An int8 ``cat`` of 1-channel maps, like int8 conv kernels, returns channels-last tensors, so the
    compiled model's outputs were not contiguous where eager's are (a ``.view`` on them fails). Fix:
    lower-<engine> makes the outputs contiguous where eager's outputs are (eager's outputs decide: shapes
    propagated after quantization no longer know eager's layout)."""
    class CatAndConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([x, x], 1), self.conv(x)

    x = torch.randn(3, 1, 6, 7)
    compiled, db = compile_calibrated_on(CatAndConv().eval(), target, x)
    assert db >= SQNR_FLOOR_DB
    assert all(out.is_contiguous() for out in compiled(x))


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2, padding=1, count_include_pad=False),
                                  nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)],
                         ids=["exclude-padding-2", "exclude-padding-3"])
def test_qnnpack_average_pooling_that_excludes_padding_stays_in_reference_form(pool: nn.Module):
    """qnnpack's int8 average pooling ignores ``count_include_pad=False`` (with padding): SQNR 4.2 dB.
    Fix: lower-qnnpack leaves such pooling in its reference form (dequantize -> pool -> quantize), which x86
    and fbgemm still run on int8."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1), pool).eval()
    x = torch.randn(3, 4, 5, 7)
    for target in ("qnnpack", "x86", "fbgemm"):
        compiled, db = compile_calibrated_on(model, target, x)
        assert db >= SQNR_FLOOR_DB
        assert _pools_on_int8(compiled.graph_module) == (target != "qnnpack")


class ScaledSigmoid(nn.Module):
    def __init__(self, cat: bool = False) -> None:
        super().__init__()
        self.conv, self.cat = nn.Conv2d(4, 4, 1), cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        gate = torch.sigmoid(y)
        if self.cat:  # cat shares qparams among its inputs: the sigmoid's become calibrated ones
            gate = torch.cat([gate, y], 1)
        return 16 * gate  # as swin_v2's continuous position bias


@pytest.mark.parametrize("cat", [False, True])
def test_qnnpack_sigmoid_with_calibrated_qparams_stays_in_reference_form(cat: bool):
    """Found by the zoo sweep (swin_v2_t/s/b on qnnpack): qnnpack's int8 sigmoid only produces output qparams
    (1/256, 0) and hits an internal assert for any others, such as the calibrated ones. Fix: lower-qnnpack
    leaves other sigmoids in their reference form; the x86 engine still runs them on its int8 kernel. Since
    sigmoids get fixed qparams (1/256, 0), only one whose output shares qparams with other values (a cat)
    has calibrated ones."""
    x = torch.randn(2, 4, 5, 5)
    for target in ("qnnpack", "x86"):
        compiled, db = compile_calibrated_on(ScaledSigmoid(cat).eval(), target, x)
        assert db >= SQNR_FLOOR_DB
        on_int8 = any(n.target is torch.ops.quantized.sigmoid for n in compiled.graph_module.graph.nodes)
        assert on_int8 == (target == "x86" or not cat)


@pytest.mark.parametrize("target", ["x86", "fbgemm"])
def test_depthwise_conv_with_8_bit_weights_never_runs_on_fbgemms_saturating_kernel(
        target: str, monkeypatch: pytest.MonkeyPatch):
    """Found by comparing mobilenet_v2's lowered graph with its reference layer by layer (x86): fbgemm's
    depthwise conv kernel sums pairs of u8 x s8 products into int16 with saturation even on VNNI CPUs, so with
    8-bit weights a few outputs came back up to 88 int8 steps off, on the layers where lower-x86's autotune
    picked fbgemm's packing (the lowered model 9 dB from its reference). Fix: lower-x86 and lower-fbgemm pack
    such layers for oneDNN (int32 accumulation)."""
    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: True)  # 8-bit weights on any CPU
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    lowered = fxforge.compile(model, target, example_inputs=x, calibration=[x])
    reference = compile_reference(model, x, target, calibration=[x])
    with torch.inference_mode():
        steps = (lowered(x) - reference(x)).abs().max().item() / reference.report.quantization.layers[-1].scale
    assert steps <= 1.0, f"{target}: the depthwise conv's output {steps:.0f} int8 steps from its reference"
    depthwise = [m.engine for m in lowered.graph_module.modules()
                 if isinstance(m, PackedWeight) and m.geometry.get("groups", 1) > 1]
    assert depthwise == ["onednn"]

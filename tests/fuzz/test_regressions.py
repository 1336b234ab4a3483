"""Bugs the graph fuzzer (test_fuzz_graphs.py) found, each reduced to a minimal model and fixed.

Each test names the bug; its docstring says what was wrong, which pass was at fault, and the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxforge
from fxforge.quant.sqnr import outputs_sqnr_db
from fxforge.testing import FuzzGraph, FuzzModel
from fxforge.testing.fuzz import Op
from helpers import one_intra_op_thread, randomize_bn, rel_error

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)

SQNR_FLOOR_DB = 20.0  # these graphs are one or two quantization points deep: ~35 dB (7 bits) to ~41 dB (8 bits)


def _int8(model: nn.Module, target: str, x: torch.Tensor) -> tuple[fxforge.CompiledModule, float]:
    """Compile for ``target`` calibrated on ``x``; (compiled, SQNR of its output on ``x`` against eager)."""
    compiled = fxforge.compile(model, target, example_inputs=x, calibration=[x])
    with torch.no_grad():
        return compiled, outputs_sqnr_db(model(x), compiled(x))


def _targets_of(gm: fx.GraphModule) -> list[str]:
    return [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op != "placeholder"]


class _MutateThroughFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        F.hardswish(y.flatten(1), inplace=True)  # flatten is a view of y: hardswish changes y too
        return y * 2


def test_cpu_in_place_op_through_a_flatten_of_a_conv_output():
    """lower-cpu made the conv output channels-last, so ``y.flatten(1)`` became a copy and the in-place
    hardswish no longer reached ``y`` (relative error 0.6). Fix: lower-cpu makes a value NCHW-contiguous right
    after its producer when an in-place op mutates it through a flatten/reshape/view (one shared copy)."""
    model = _MutateThroughFlatten().eval()
    x = torch.randn(1, 1, 5, 5)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert "OneDnnConv2d" in str(compiled.graph_module)  # still lowered
    with torch.no_grad():
        assert rel_error(compiled(x), model(x)) <= 1e-5


@pytest.mark.parametrize("pool", [nn.MaxPool2d(1, stride=2), nn.AvgPool2d(1), nn.MaxPool2d((1, 1))],
                         ids=["max-1x1-stride-2", "avg-1x1", "max-(1,1)"])
def test_qnnpack_pooling_over_one_element_windows(pool: nn.Module):
    """qnnpack's int8 pooling kernels reject one-element windows ("1x1 pooling is meaningless": an internal
    assert at run time). Fix: max pooling over one element (a strided subsampling) is a ``share`` op in the
    op table (dequantize -> pool -> quantize with the input's qparams, exact), and lower-qnnpack leaves
    average pooling over one element in that reference form."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1), pool).eval()
    _, db = _int8(model, "qnnpack", torch.randn(3, 4, 5, 6))
    assert db >= SQNR_FLOOR_DB


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
def test_int8_adaptive_average_pooling_of_a_1x1_map_to_a_larger_one(target: str):
    """torch's int8 adaptive_avg_pool2d is wrong when it upsamples a 1x1 map (N > 1, C > 1: off by whole
    input ranges, SQNR -2.5 dB; 1x1 maps are NCHW and channels-last at once). Fix: lower-<engine> leaves
    such pooling in its reference form."""
    class MeanThenUpsample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.conv(x).mean((2, 3), keepdim=True))  # an NCHW-strided 1x1 map

    compiled, db = _int8(MeanThenUpsample().eval(), target, torch.randn(3, 8, 7, 6))
    assert db >= SQNR_FLOOR_DB
    assert "conv2d" in " ".join(_targets_of(compiled.graph_module))  # the conv still runs on its int8 kernel


class _BnPoolRelu6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = randomize_bn(nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveMaxPool2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.pool(self.bn(x)))


def test_qnnpack_relu6_on_a_channels_last_int8_tensor():
    """qnnpack's int8 clamp (relu6, hardtanh, clamp) misreads channels-last tensors, which int8 kernels
    return (here batch norm, then a max-pool in fp32 that keeps the layout): SQNR 1.2 dB. Fix: lower-qnnpack
    gives every int8 clamp an NCHW-contiguous input."""
    model = _BnPoolRelu6().eval()
    compiled, db = _int8(model, "qnnpack", torch.randn(3, 8, 1, 5))
    assert db >= SQNR_FLOOR_DB
    assert "batch_norm2d" in _targets_of(compiled.graph_module)


class _ConvView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y.view(y.shape[0], -1), y


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
def test_int8_view_of_an_int8_conv_output(target: str):
    """int8 kernels return channels-last tensors, on which ``.view`` fails: the compile failed on its own
    example ("view size is not compatible with input tensor's size and stride"). Fix: lower-<engine>
    restores eager's NCHW layout before ``.view`` (as lower-cpu does)."""
    _, db = _int8(_ConvView().eval(), target, torch.randn(3, 3, 6, 7))
    assert db >= SQNR_FLOOR_DB


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
def test_int8_outputs_keep_eager_layout(target: str):
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
    compiled, db = _int8(CatAndConv().eval(), target, x)
    assert db >= SQNR_FLOOR_DB
    assert all(out.is_contiguous() for out in compiled(x))


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2, padding=1, count_include_pad=False),
                                  nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)],
                         ids=["exclude-padding-2", "exclude-padding-3"])
def test_qnnpack_average_pooling_that_excludes_padding(pool: nn.Module):
    """qnnpack's int8 average pooling ignores ``count_include_pad=False`` (with padding): SQNR 4.2 dB.
    Fix: lower-qnnpack leaves such pooling in its reference form (dequantize -> pool -> quantize), which x86
    and fbgemm still run on int8."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1), pool).eval()
    x = torch.randn(3, 4, 5, 7)
    for target in ("qnnpack", "x86", "fbgemm"):
        compiled, db = _int8(model, target, x)
        assert db >= SQNR_FLOOR_DB
        assert _pools_on_int8(compiled.graph_module) == (target != "qnnpack")


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_int8_average_pooling_with_a_divisor_override(target: str, functional: bool):
    """Average pooling requantized its output with its input's qparams, but with ``divisor_override`` it is a
    scaled sum (3x3 window / 2: up to 4.5x the input range), so outputs saturated: SQNR 19.7 dB (x86) and
    15.6 dB (qnnpack, whose int8 kernel also ignores the override) for a single conv + pool, ~36 / 42 dB
    expected. Fix: the op table makes such pooling a compute op, with qparams of its own."""
    class ConvSumPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv2d(4, 4, 1), nn.AvgPool2d(3, divisor_override=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return F.avg_pool2d(y, 3, divisor_override=2) if functional else self.pool(y)

    _, db = _int8(ConvSumPool().eval(), target, torch.randn(3, 4, 9, 9))
    assert db >= 30.0


def _pools_on_int8(gm: fx.GraphModule) -> bool:
    """Whether the pooling module reads an int8 tensor (not a dequantized one)."""
    pool = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                    nn.AvgPool2d))
    return not (pool.args[0].op == "call_method" and pool.args[0].target == "dequantize")


class _SquaresItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x *= x  # legal in eager: the caller's tensor changes
        return self.conv(x)


def test_calibration_leaves_the_callers_data_alone():
    """Calibration ran the model on the caller's own tensors, so a model that changes its input in place
    changed the calibration data (found when a second compile on the same list calibrated on x*x and
    disagreed with the first). Fix: calibration feeds copies, as compile already did for example_inputs."""
    x = torch.randn(2, 1, 4, 4)
    data = [x.clone(), x.clone()]
    fxforge.compile(_SquaresItsInput().eval(), "x86", example_inputs=x.clone(), calibration=data)
    assert all(torch.equal(batch, x) for batch in data)


class _ScaledSigmoid(nn.Module):
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
def test_qnnpack_sigmoid_with_calibrated_qparams(cat: bool):
    """Found by the zoo sweep (swin_v2_t/s/b on qnnpack): qnnpack's int8 sigmoid only produces output qparams
    (1/256, 0) and hits an internal assert for any others, such as the calibrated ones. Fix: lower-qnnpack
    leaves other sigmoids in their reference form; the x86 engine still runs them on its int8 kernel. Since
    sigmoids get fixed qparams (1/256, 0), only one whose output shares qparams with other values (a cat)
    has calibrated ones."""
    x = torch.randn(2, 4, 5, 5)
    for target in ("qnnpack", "x86"):
        compiled, db = _int8(_ScaledSigmoid(cat).eval(), target, x)
        assert db >= SQNR_FLOOR_DB
        on_int8 = any(n.target is torch.ops.quantized.sigmoid for n in compiled.graph_module.graph.nodes)
        assert on_int8 == (target == "x86" or not cat)


def test_cpu_conv_packs_its_weight_per_input_size():
    """Found by the zoo sweep (regnet_y_8gf: 7x slower than eager at batch 1 after compiling at batch 2):
    oneDNN lays a prepacked conv weight out for one input size, and run at another size the same weight can
    be ~100x slower (its 896-channel, 16-group convs on 4x4 maps: 40 ms instead of 0.3 ms). Fix: OneDnnConv2d
    packs its weight once per input size it meets (up to MAX_OTHER_SIZES, then the dense weight). Checked
    here by values and by which weight each size uses (no timing)."""
    from fxforge.backends.cpu import MAX_OTHER_SIZES, OneDnnConv2d

    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=16), nn.ReLU()).eval()
    compiled = fxforge.compile(model, "cpu", example_inputs=torch.randn(2, 64, 4, 4))
    conv = next(m for m in compiled.modules() if isinstance(m, OneDnnConv2d))
    sizes = [(b, 64, 4, 4) for b in (1, 3, 5, 6, 7, 9)] + [(2, 64, 4, 4)]
    for size in sizes:
        x = torch.randn(size)
        with torch.no_grad():
            assert rel_error(compiled(x), model(x)) <= 1e-5
    assert list(conv.other_sizes) == sizes[:MAX_OTHER_SIZES]  # the example's size keeps its own packing
    assert conv._weight_for(torch.randn(9, 64, 4, 4)) is conv.weight  # past the cap: the dense weight
    assert not copy.deepcopy(conv).other_sizes  # copies pack again when they need to


class _CatThenView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([x, x], 1)
        return y.view(y.shape[0], -1)


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
def test_int8_view_of_an_int8_cat_of_one_channel_maps(target: str):
    """torch's int8 cat of 1-channel maps returns a channels-last tensor, so ``.view`` failed inside
    insert-qdq's own run of the reference graph (PassError from a ShapeProp error). Fix: insert-qdq turns
    ``view`` on int8 values into ``reshape`` (int8 values are never changed in place: the copy is unseen)."""
    _, db = _int8(_CatThenView().eval(), target, torch.randn(2, 1, 1, 3))
    assert db >= SQNR_FLOOR_DB


@pytest.mark.parametrize("target", ["x86", "fbgemm"])
def test_int8_conv_input_codes_beyond_the_seven_bit_range(target: str, monkeypatch: pytest.MonkeyPatch):
    """Found by ``make fuzz``. x86 / fbgemm on CPUs without VNNI quantized activations to 7 bits (codes 0-127)
    because AVX2's ``vpmaddubsw`` sums pairs of u8 x s8 products into int16 with saturation. When the
    MSE-optimal range clipped the top of a value's distribution, ``quantize_per_tensor`` still wrote codes up to
    255 for the values above it (it clamps to the dtype, not to 127), and so did the int8 kernels' outputs. The
    reference graph dequantized those codes exactly; fbgemm's conv saturated its int16 pair sums on them (conv4's
    int8 output off by up to 40 codes, lowered graph 5.1 dB from its reference). Fix (qspec.backend_quant):
    without VNNI, static int8 keeps 8-bit activations and narrows the weights to [-64, 63] instead, as ONNX
    Runtime's reduce_range does: ``2 * 255 * 64`` fits int16 whatever the codes, so no input can saturate."""
    from fxforge.quant import qspec

    monkeypatch.setattr(qspec, "cpu_has_vnni", lambda: False)  # the AVX2 scheme on any CPU
    spec = qspec.backend_quant(target)
    assert (spec.activation.quant_max, spec.weight.quant_min, spec.weight.quant_max) == (255, -64, 63)
    graph = FuzzGraph(shape=(1, 3, 3), batch=3, ops=(
        Op("act", (0,), {"fn": "relu", "spelling": "module"}),
        Op("conv", (1,), {"out_channels": 6, "kernel_size": (1, 1), "stride": 1, "padding": "same", "dilation": 1,
                          "groups": 1, "bias": False, "padding_mode": "zeros"}),
        Op("pool", (2,), {"pool": "avg", "spelling": "module", "args": (
            ("kernel_size", 2), ("stride", None), ("padding", 1), ("ceil_mode", False), ("count_include_pad", True),
            ("divisor_override", None))}),
        Op("conv", (3,), {"out_channels": 1, "kernel_size": (1, 1), "stride": 2, "padding": 0, "dilation": 2,
                          "groups": 1, "bias": False, "padding_mode": "zeros"}),
        Op("add", (4, 4), {"spelling": "op"}),
    ), outputs=(5,), seed=128)
    model = FuzzModel(graph)
    data = torch.cat([graph.example(), graph.example(5, seed=2)])
    lowered = fxforge.compile(model, target, example_inputs=graph.example(), calibration=[data])
    reference = fxforge.compile(model, target, example_inputs=graph.example(), calibration=[data],
                                pipeline=fxforge.pipeline_for(target).replace(f",lower-{target}", ""))
    with torch.no_grad():
        assert outputs_sqnr_db(reference(data), lowered(data)) >= 40.0  # 5.1 dB before the fix; now equal


class _ConvThenCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, 2), padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, y], 1)


def test_cpu_output_of_a_reasserted_cat_keeps_eager_layout():
    """to-nhwc re-asserts channels-last after a cat, and gave the re-assertion node channels-last shape
    metadata; the outputs' layout is decided from that metadata (eager's), so the cat, returned, stayed
    channels-last where eager's is contiguous. Fix: to-nhwc's conversion nodes keep eager's metadata."""
    model, x = _ConvThenCat().eval(), torch.randn(1, 1, 1, 1)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    with torch.no_grad():
        out = compiled(x)
        assert out.is_contiguous() and rel_error(out, model(x)) <= 1e-5


class _OneChannelConvView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(torch.relu(x))
        return y.view(y.shape[0], -1)


def test_cpu_view_of_a_one_channel_conv_output():
    """to-nhwc inserts no NCHW copy before a view of a one-channel value (it is NCHW-contiguous in either
    layout), but its own invariant ('no view reads a channels-last value') still counted it and failed the
    compile. Fix: the invariant exempts values that are contiguous in both layouts, as the pass does."""
    model, x = _OneChannelConvView().eval(), torch.randn(1, 1, 3, 3)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    with torch.no_grad():
        assert rel_error(compiled(x), model(x)) <= 1e-5


class _OneByOneLeaves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(inplace=True)
        self.c2, self.up = nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        z = self.c2(y)
        y = self.act(y)  # in place: the conv's readers all read its NCHW copy, made right after it
        return self.up(x + y), z  # the add and conv-transpose hold no Conv2d: no region, eager layout


def test_cpu_one_by_one_map_leaving_a_region_is_restrided():
    """On 1x1 maps ``contiguous()`` returns a channels-last tensor as it is (it is contiguous in both layouts),
    but torch still reads its strides as channels-last, so the conv-transpose outside any region returned
    channels-last where eager's output is contiguous. Fix: to-nhwc converts values that are contiguous in both
    layouts at the example's shape with ``.to(memory_format=...)``, which restrides them."""
    model, x = _OneByOneLeaves().eval(), torch.randn(1, 1, 1, 1)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    with torch.no_grad():
        out = compiled(x)
        assert out[0].is_contiguous() and rel_error(out, model(x)) <= 1e-5


def test_cpu_dilated_one_by_one_conv_does_not_crash():
    """oneDNN's prepacked conv segfaulted on a 1x1 conv with dilation 2, stride 3 and padding 2 over a 4x1 map
    (torch 2.14; found by a longer fuzzing run, in any input layout). Dilation of a one-tap kernel dimension
    changes nothing: OneDnnConv2d drops it. Run in a subprocess: before the fix it killed the interpreter."""
    import subprocess
    import sys

    code = ("import torch, fxforge; from torch import nn; torch.set_num_threads(1)\n"
            "m = nn.Sequential(nn.Conv2d(2, 10, 1, stride=3, padding=2, dilation=2)).eval()\n"
            "x = torch.randn(1, 2, 4, 1)\n"
            "c = fxforge.compile(m, 'cpu', example_inputs=x)\n"
            "assert 'OneDnnConv2d' in str(c.graph_module)\n"
            "with torch.no_grad():\n"
            "    for _ in range(20): torch.testing.assert_close(c(x), m(x))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

"""The CUDA targets. Without a GPU: availability, pipeline text, and the pipelines' graph-level work checked on
CPU graphs (a CudaConv2d computes its F.conv2d composition on CPU tensors; fp16/bf16 convs run on the CPU
too). With a GPU (tests marked ``needs_gpu``): the fused cuDNN kernels, CUDA graph capture and fp16 SQNR."""

import copy

import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends import cuda
from fxforge.backends.cuda import ALIGNMENT, CudaConv2d, _autotune, choose_kernel, fused_kernel
from fxforge.backends.cuda_graphs import CudaRuntime, tf32_policy
from fxforge.pipeline.fragments import with_options
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import module_types, randomize_bn, reestimate_bn, rel_error

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_TARGETS = ("cuda", "cuda-bf16", "cuda-fp32")
LOWERING = {"cuda": "lower-cuda", "cuda-bf16": "lower-cuda{dtype=bfloat16}", "cuda-fp32": "lower-cuda{dtype=float32}"}


class Block(nn.Module):
    """A 3-channel stem, conv+bn+relu, a residual conv+bn+add+relu, a depthwise conv+relu6, a .view, a linear."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.dw, self.act = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU6()
        self.fc = nn.Linear(c * 8 * 8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)) + x)
        y = self.act(self.dw(y))
        return self.fc(y.view(y.size(0), -1))


def inner(compiled: fxforge.CompiledModule) -> torch.fx.GraphModule:
    """The lowered graph inside the CudaRuntime the pipeline ends with."""
    runtime = compiled.graph_module.cuda_runtime
    assert isinstance(runtime, CudaRuntime)
    return runtime.graph_module


def cuda_pipeline_on_cpu(model: nn.Module, x, target: str = "cuda", pipeline: str | None = None, **kwargs):
    return fxforge.compile(model, "cpu", example_inputs=x, pipeline=pipeline or fxforge.pipeline_for(target), **kwargs)


def convs(gm: torch.fx.GraphModule) -> dict[str, CudaConv2d]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, CudaConv2d)}


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_cuda_pipeline_text_is_available_without_a_gpu(target):
    text = fxforge.pipeline_for(target)
    graph_passes = "remove-noops,dce,normalize-inplace,normalize-relu,normalize-gelu,fold-bn,fuse-conv,to-nhwc"
    assert text == f"{graph_passes},{LOWERING[target]},cuda-runtime"
    assert fxforge.PassManager.from_text(text).pipeline == text  # canonical: the compiled module reports it so


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_cuda_targets_without_gpu_are_backend_unavailable(target):
    assert target not in fxforge.targets()
    with pytest.raises(fxforge.BackendUnavailableError, match="no CUDA GPU.*Usable here: cpu"):
        fxforge.compile(Block().eval(), target, example_inputs=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("text, match", [("lower-cuda{dtype=float64}", "dtype='float64'.*float16, bfloat16"),
                                         ("lower-cuda{fused=maybe}", "expected true or false")])
def test_lower_cuda_rejects_bad_options(text, match):
    with pytest.raises(fxforge.ConfigError, match=match):
        fxforge.PassManager.from_text(text)


# ---------------------------------------------------------------------------------------------- structure
def test_cuda_pipeline_on_a_cpu_graph_folds_bn_fuses_and_converts_weights():
    model = randomize_bn(Block()).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = cuda_pipeline_on_cpu(model, x)
    gm = inner(compiled)
    assert "BatchNorm2d" not in module_types(gm) and "FusedConv" not in module_types(gm)
    kernels = {name: m.kernel for name, m in convs(gm).items()}
    # the stem has 3 input channels, the depthwise conv is grouped and ends in relu6: no fused kernel for those
    assert kernels == {"stem": "conv2d", "c1": "cudnn_relu", "c2": "cudnn_add_relu", "dw": "conv2d"}
    for m in convs(gm).values():
        assert m.weight.dtype == torch.float16 and m.weight.is_contiguous(memory_format=torch.channels_last)
        assert m.bias.dtype == torch.float16  # c1 had no bias: folding BN gave it one
    assert gm.fc.weight.dtype == torch.float16
    y = compiled(x)
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert outputs_sqnr_db(model(x), y) >= 40


def test_inputs_are_cast_once_at_the_top_and_outputs_cast_back():
    gm = inner(cuda_pipeline_on_cpu(randomize_bn(Block()).eval(), torch.randn(2, 3, 8, 8)))
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert casts[0].args[0].op == "placeholder"
    assert casts[0].kwargs == {"dtype": torch.float16, "memory_format": torch.channels_last}
    assert casts[-1].kwargs == {"dtype": torch.float32, "memory_format": torch.contiguous_format}
    assert [n.op for n in casts[-1].users] == ["output"] and len(casts) == 2


def test_view_of_a_channels_last_value_gets_a_contiguous_copy_first():
    gm = inner(cuda_pipeline_on_cpu(randomize_bn(Block()).eval(), torch.randn(2, 3, 8, 8)))
    view = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view")
    assert view.args[0].op == "call_method" and view.args[0].target == "contiguous"


@pytest.mark.parametrize("target, dtype, min_db", [("cuda-bf16", torch.bfloat16, 25), ("cuda-fp32", torch.float32, 90)])
def test_other_dtypes(target, dtype, min_db):
    model = randomize_bn(Block()).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = cuda_pipeline_on_cpu(model, x, target)
    assert {m.weight.dtype for m in convs(inner(compiled)).values()} == {dtype}
    y = compiled(x)
    assert y.dtype == torch.float32 and outputs_sqnr_db(model(x), y) >= min_db


def test_fused_false_keeps_every_conv_on_conv2d():
    x = torch.randn(2, 3, 8, 8)
    pipeline = with_options(fxforge.pipeline_for("cuda"), "lower-cuda", fused=False)
    compiled = cuda_pipeline_on_cpu(randomize_bn(Block()).eval(), x, pipeline=pipeline)
    assert {m.kernel for m in convs(inner(compiled)).values()} == {"conv2d"}
    assert "not fused: fused=false: 4" in str(compiled.report)


def test_report_says_why_convs_were_not_fused():
    report = str(cuda_pipeline_on_cpu(randomize_bn(Block()).eval(), torch.randn(2, 3, 8, 8)).report)
    assert "convs lowered: 2 conv2d, 1 cudnn_add_relu, 1 cudnn_relu" in report
    assert f"channels not multiples of {ALIGNMENT}: 1" in report and "post-ops relu6" in report


def test_an_input_returned_as_is_is_not_rounded():
    class PassThrough(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return torch.relu(self.conv(x)), x

    x = torch.randn(1, 3, 4, 4)
    y, same = cuda_pipeline_on_cpu(PassThrough().eval(), x)(x)
    assert torch.equal(same, x) and y.dtype == torch.float32


def test_integer_outputs_and_non_conv_models_keep_their_dtypes():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return y, y.argmax(1)

    model, x = Mlp().eval(), torch.randn(3, 8)
    y, idx = cuda_pipeline_on_cpu(model, x)(x)
    assert y.dtype == torch.float32 and idx.dtype == torch.int64
    assert outputs_sqnr_db(model(x)[0], y) >= 40


def test_unsupported_convs_stay_eager_with_converted_weights():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Conv2d(8, 8, 3, padding="same")
            self.circ = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
            self.c1d = nn.Conv1d(8, 8, 3)

        def forward(self, x):
            y = torch.relu(self.circ(torch.relu(self.same(x))))
            return self.c1d(y.flatten(2))

    model, x = Odd().eval(), torch.randn(1, 8, 6, 6)
    compiled = cuda_pipeline_on_cpu(model, x)
    gm = inner(compiled)
    assert not convs(gm) and all(p.dtype == torch.float16 for p in gm.parameters())
    assert outputs_sqnr_db(model(x), compiled(x)) >= 40


def test_verify_numeric_compares_reduced_precision_graphs_by_sqnr():
    compiled = cuda_pipeline_on_cpu(randomize_bn(Block()).eval(), torch.randn(2, 3, 8, 8), verify="numeric")
    assert compiled.report.max_rel_error > 1e-4  # fp16: more than the fp32 tolerance, accepted by SQNR


def test_compile_leaves_the_users_model_alone():
    model = randomize_bn(Block()).eval()
    before = copy.deepcopy(model.state_dict())
    cuda_pipeline_on_cpu(model, torch.randn(2, 3, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_compiled_module_survives_deepcopy_and_save_load(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    compiled = cuda_pipeline_on_cpu(randomize_bn(Block()).eval(), x)
    torch.save(compiled, tmp_path / "m.pt")
    for other in (copy.deepcopy(compiled), torch.load(tmp_path / "m.pt", weights_only=False)):
        assert torch.equal(other(x), compiled(x))
        conv = inner(other).c1
        assert conv.kernel == "cudnn_relu" and conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fp16_pipeline_loses_no_more_than_eager_fp16(name):
    """On CPU fp16 (rounding to fp16 between layers, like the GPU). Random-init networks amplify rounding
    errors layer after layer; mobilenet_v2 does so strongly, so eager .half() is the yardstick there."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = reestimate_bn(getattr(torchvision.models, name)(), [torch.randn(8, 3, 64, 64) for _ in range(2)])
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        reference = model(x)
        eager_half = outputs_sqnr_db(reference, copy.deepcopy(model).half()(x.half()).float())
    sqnr = outputs_sqnr_db(reference, cuda_pipeline_on_cpu(model, x)(x))
    assert sqnr >= eager_half - 1.0
    if name == "resnet18":
        assert sqnr >= 40


# ---------------------------------------------------------------------------------------------- kernels
def test_fused_kernels_are_called_with_the_argument_order_of_their_schema():
    """CudaConv2d passes these positionally: a change of the ops' signatures must fail here, not on a GPU."""
    def names(op):
        return [a.name for a in op.default._schema.arguments]

    assert names(torch.ops.aten.cudnn_convolution_relu) == [
        "self", "weight", "bias", "stride", "padding", "dilation", "groups"]
    assert names(torch.ops.aten.cudnn_convolution_add_relu) == [
        "self", "weight", "z", "alpha", "bias", "stride", "padding", "dilation", "groups"]


@pytest.mark.parametrize("conv, add, activation, expected", [
    (nn.Conv2d(16, 32, 3), False, "relu", "cudnn_relu"),
    (nn.Conv2d(16, 32, 3), True, "relu", "cudnn_add_relu"),
    (nn.Conv2d(16, 32, 3), True, "", None),
    (nn.Conv2d(16, 32, 3), False, "relu6", None),
    (nn.Conv2d(16, 32, 3, groups=2), False, "relu", None),
    (nn.Conv2d(16, 32, 3, dilation=2), False, "relu", None),
    (nn.Conv2d(3, 32, 7), False, "relu", None),
    (nn.Conv2d(16, 20, 3), False, "relu", None),
])
def test_fused_kernel_rules(conv, add, activation, expected):
    kernel, why = fused_kernel(conv, add, activation)
    assert kernel == expected and bool(why) == (expected is None)


class FailingConv(CudaConv2d):
    """A CudaConv2d whose ``failing`` kernel raises as cuDNN does without an engine for it."""

    failing: str | None = None

    def forward(self, x, other=None):
        if self.kernel == self.failing:
            raise RuntimeError("FIND was unable to find an engine to execute this computation")
        return super().forward(x, other)


def fake_clock(module: CudaConv2d, ms, timed: list | None = None):
    """A clock that runs the sample (on CPU: the conv2d composition) and reports ``ms(module)`` per call of the
    module in it (a sample may hold several calls); each call's (kernel, add) goes into ``timed``."""
    def timer(fn):
        calls = []
        handle = module.register_forward_hook(lambda m, args, out: calls.append((m.kernel, m.add)))
        try:
            fn()
        finally:
            handle.remove()
        if timed is not None:
            timed.extend(calls)
        return len(calls) * ms(module) / 1e3

    return timer


@pytest.mark.parametrize("ms, failing, expected", [
    ({"cudnn_relu": 1.0, "conv2d": 2.0}, None, "cudnn_relu"),
    ({"cudnn_relu": 2.0, "conv2d": 1.0}, None, "conv2d"),
    ({"cudnn_relu": 1.0, "conv2d": 2.0}, "cudnn_relu", "conv2d"),
])
def test_autotune_keeps_the_faster_kernel_that_runs(ms, failing, expected):
    module = FailingConv(nn.Conv2d(8, 8, 3), torch.float32, activation="relu", kernel="cudnn_relu")
    module.failing = failing
    note = choose_kernel(module, torch.randn(1, 8, 6, 6), None, fake_clock(module, lambda m: ms[m.kernel]))
    assert module.kernel == expected
    assert ("failed (FIND was unable" in note) == (failing is not None)
    assert f"conv2d {ms['conv2d']:.3f} ms" in note


def test_autotune_times_each_fused_layer_on_its_shapes_and_reports_the_switches():
    pipeline = with_options(fxforge.pipeline_for("cuda"), "lower-cuda", autotune=False)
    gm = inner(cuda_pipeline_on_cpu(randomize_bn(Block()).eval(), torch.randn(2, 3, 8, 8), pipeline=pipeline))
    timed = []

    def ms(module: CudaConv2d) -> float:  # the calls run on the layer's example shapes (the residual's too)
        return 1.0 if (module.kernel == "conv2d") == module.add else 2.0  # c2 (add) is faster unfused

    notes = {}
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target in ("c1", "c2")]:
        notes[node.target] = _autotune(gm, [node], fake_clock(gm.get_submodule(node.target), ms, timed))
    assert {name: m.kernel for name, m in convs(gm).items()} == {
        "stem": "conv2d", "c1": "cudnn_relu", "c2": "conv2d", "dw": "conv2d"}
    assert sorted(set(timed)) == [("conv2d", False), ("conv2d", True), ("cudnn_add_relu", True), ("cudnn_relu", False)]
    assert notes["c1"] == ["autotune: 1 layer(s) kept their fused kernel, 0 run conv2d instead"]
    assert notes["c2"][0] == "autotune: 0 layer(s) kept their fused kernel, 1 run conv2d instead"
    assert notes["c2"][1] == "  c2: cudnn_add_relu 2.000 ms, conv2d 1.000 ms -> conv2d"


class ReplayCapture:
    """capture(fn, args) as cuda-runtime does it: fn recorded once, replays counted (on CPU: fn re-run)."""

    def __init__(self) -> None:
        self.replays = 0

    def __call__(self, fn, args):
        out = fn(*args)

        def replay():
            self.replays += 1
            fn(*args)

        return replay, out


def test_autotune_times_graph_replays_not_eager_calls():
    module = FailingConv(nn.Conv2d(8, 8, 3), torch.float32, activation="relu", kernel="cudnn_relu")
    capture, timed_replays = ReplayCapture(), []

    def timer(fn):
        before = capture.replays
        fn()
        timed_replays.append(capture.replays - before)
        return 1e-3

    choose_kernel(module, torch.randn(1, 8, 6, 6), None, timer, capture=capture)
    assert timed_replays and all(n == cuda.SCHEDULE.calls for n in timed_replays)  # each sample: replays only


def test_autotune_runs_under_the_runtime_tf32_policy(monkeypatch):
    entered = []
    real = cuda.tf32_policy

    def spy(allow):
        entered.append(allow)
        return real(allow)

    monkeypatch.setattr(cuda, "tf32_policy", spy)
    cuda._autotune(torch.fx.symbolic_trace(nn.Identity()), [], None, tf32=True)
    assert entered == [True]

    class Ctx:
        class report:  # noqa: N801 - the one attribute runtime_tf32 reads
            pipeline = fxforge.pipeline_for("cuda-fp32")

    assert cuda.runtime_tf32(Ctx()) is False
    Ctx.report.pipeline = with_options(Ctx.report.pipeline, "cuda-runtime", tf32=True)
    assert cuda.runtime_tf32(Ctx()) is True


def test_without_autotune_a_failing_fused_kernel_is_replaced_before_capture():
    module = FailingConv(nn.Conv2d(8, 8, 3), torch.float32, activation="relu", kernel="cudnn_relu")
    module.failing = "cudnn_relu"
    note = choose_kernel(module, torch.randn(1, 8, 6, 6), None, timed=False)
    assert module.kernel == "conv2d" and "cudnn_relu failed (FIND was unable" in note
    working = FailingConv(nn.Conv2d(8, 8, 3), torch.float32, activation="relu", kernel="cudnn_relu")
    assert choose_kernel(working, torch.randn(1, 8, 6, 6), None, timed=False) == ""
    assert working.kernel == "cudnn_relu"


def test_the_residual_reaches_the_fused_add_in_the_compute_dtype(monkeypatch):
    seen = []

    def fake_add_relu(x, weight, other, alpha, bias, *rest):
        seen.append((x.dtype, other.dtype))
        return torch.zeros(1)

    monkeypatch.setattr(cuda, "fused_kernels_run_on", lambda x: True)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", fake_add_relu)
    module = CudaConv2d(nn.Conv2d(8, 8, 3), torch.float16, add=True, activation="relu", kernel="cudnn_add_relu")
    module(torch.randn(1, 8, 6, 6, dtype=torch.float16), torch.randn(1, 8, 4, 4))  # an fp32 residual
    assert seen == [(torch.float16, torch.float16)]


def test_references_and_numeric_checks_are_exact_fp32_not_tf32():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.allow_tf32)
            return x + 1

    before = torch.backends.cudnn.allow_tf32
    tf32_on = tf32_policy(True)
    with tf32_on:  # torch's default for cuDNN convolutions
        fxforge.compile(nn.Sequential(Spy(), nn.Conv2d(3, 4, 1)).eval(), "cpu", example_inputs=torch.randn(1, 3, 4, 4),
                        verify="numeric", leaf_modules=[Spy])
        assert torch.backends.cudnn.allow_tf32 is True  # restored after the compile
    assert seen and not any(seen)  # the reference, every check and the final comparison ran without TF32
    assert torch.backends.cudnn.allow_tf32 == before


@pytest.mark.parametrize("activation", ["", "relu", "relu6", "hardswish", "silu"])
@pytest.mark.parametrize("add", [False, True])
def test_cuda_conv2d_composition_matches_the_fused_conv_it_replaces(add, activation):
    from fxforge.graph.fused import FusedConv

    conv = nn.Conv2d(8, 8, 3, padding=1, stride=1)
    fused = FusedConv(conv, add, activation)
    x, other = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    args = (x, other) if add else (x,)
    before = [a.clone() for a in args]
    lowered = CudaConv2d(conv, torch.float32, add, activation)
    torch.testing.assert_close(lowered(*args), fused(*args))
    assert all(torch.equal(a, b) for a, b in zip(args, before, strict=True))  # inputs are read, not written


# ---------------------------------------------------------------------------------------------- GPU
def gpu_model(name: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().cuda()
    return reestimate_bn(model, [torch.randn(8, 3, 224, 224, device="cuda") for _ in range(2)])


@pytest.fixture
def ieee_fp32():
    with tf32_policy(False):  # fp32 references without TF32
        yield


@needs_gpu
@pytest.mark.parametrize("name, min_db", [("resnet18", 40.0), ("mobilenet_v2", 30.0)])
def test_fp16_sqnr_against_fp32_on_gpu(name, min_db, ieee_fp32):
    model, x = gpu_model(name), torch.randn(4, 3, 224, 224, device="cuda")
    compiled = fxforge.compile(model, "cuda", example_inputs=x)
    with torch.inference_mode():
        reference = model(x)
        eager_half = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
        eager_db = outputs_sqnr_db(reference, eager_half(x.half().contiguous(memory_format=torch.channels_last)))
    sqnr = outputs_sqnr_db(reference, compiled(x))
    print(f"{name}: fxforge cuda {sqnr:.1f} dB, eager fp16 channels-last {eager_db:.1f} dB")
    assert sqnr >= min_db and sqnr >= eager_db - 1.0


@needs_gpu
def test_bf16_sqnr_against_fp32_on_gpu(ieee_fp32):
    if "cuda-bf16" not in fxforge.targets():
        pytest.skip("this GPU has no bfloat16")
    model, x = gpu_model("resnet18"), torch.randn(4, 3, 224, 224, device="cuda")
    sqnr = outputs_sqnr_db(model(x), fxforge.compile(model, "cuda-bf16", example_inputs=x)(x))
    print(f"resnet18 cuda-bf16: {sqnr:.1f} dB")
    assert sqnr >= 25


@needs_gpu
def test_fused_cudnn_kernels_run_and_match_on_gpu(ieee_fp32):
    model, x = gpu_model("resnet18"), torch.randn(2, 3, 224, 224, device="cuda")
    pipeline = with_options(fxforge.pipeline_for("cuda"), "lower-cuda", autotune=False)
    compiled = fxforge.compile(model, "cuda", example_inputs=x, pipeline=pipeline)
    kernels = {m.kernel for m in convs(inner(compiled)).values()}
    assert {"cudnn_relu", "cudnn_add_relu"} <= kernels
    assert outputs_sqnr_db(model(x), compiled(x)) >= 40


@needs_gpu
def test_autotune_measures_on_gpu_and_notes_it():
    model, x = gpu_model("resnet18"), torch.randn(2, 3, 224, 224, device="cuda")
    compiled = fxforge.compile(model, "cuda", example_inputs=x)
    fused = sum(m.kernel != "conv2d" for m in convs(inner(compiled)).values())
    assert f"autotune: {fused} layer(s) kept their fused kernel" in str(compiled.report)


@needs_gpu
def test_capture_replay_per_shape_and_outputs_are_not_overwritten():
    model = gpu_model("resnet18")
    x1, x2, x3 = (torch.randn(b, 3, 224, 224, device="cuda") for b in (2, 2, 3))
    compiled = fxforge.compile(model, "cuda", example_inputs=x1)
    runtime = compiled.graph_module.cuda_runtime
    assert len(runtime.graphs.keys) == 1 and runtime.capture_error is None  # compile ran the example once
    y1 = compiled(x1)
    kept = y1.clone()
    y2 = compiled(x2)
    assert torch.equal(y1, kept)  # the replay for x2 did not write into what the caller holds
    y3 = compiled(x3)
    assert len(runtime.graphs.keys) == 2 and y3.shape[0] == 3
    runtime.capture = False  # the same kernels, launched one by one
    for x, y in ((x1, y1), (x2, y2), (x3, y3)):
        assert outputs_sqnr_db(compiled(x), y) >= 60
    assert len(runtime.graphs.keys) == 2


@needs_gpu
def test_capture_false_runs_without_graphs(ieee_fp32):
    model, x = gpu_model("resnet18"), torch.randn(2, 3, 224, 224, device="cuda")
    pipeline = with_options(fxforge.pipeline_for("cuda"), "cuda-runtime", capture=False)
    compiled = fxforge.compile(model, "cuda", example_inputs=x, pipeline=pipeline)
    y = compiled(x)
    assert not compiled.graph_module.cuda_runtime.graphs.keys
    assert outputs_sqnr_db(model(x), y) >= 40


@needs_gpu
def test_tf32_flags_are_not_leaked_by_a_call():
    model, x = gpu_model("resnet18"), torch.randn(1, 3, 224, 224, device="cuda")
    compiled = fxforge.compile(model, "cuda-fp32", example_inputs=x)
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    compiled(x)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


@needs_gpu
def test_cuda_fp32_matches_eager_and_leaves_the_model_on_cpu(ieee_fp32):
    model = randomize_bn(Block()).eval()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    compiled = fxforge.compile(model, "cuda-fp32", example_inputs=x)
    assert next(model.parameters()).device.type == "cpu"
    out = compiled(x)
    assert out.device.type == "cuda" and rel_error(out, model.cuda()(x)) <= 1e-4


@needs_gpu
def test_auto_on_a_gpu_measures_the_cuda_targets():
    compiled = fxforge.compile(randomize_bn(Block()).eval(), "auto", example_inputs=torch.randn(2, 3, 8, 8))
    record = compiled.report.auto
    assert {"cuda", "cuda-fp32"} <= {c.target for c in record.candidates} and record.chosen == compiled.target
    fp16 = next(c for c in record.candidates if c.target == "cuda")
    assert fp16.accepted == (fp16.output_sqnr_db >= record.min_sqnr_db)
    if compiled.target == "cuda":
        assert inner(compiled).c1.weight.dtype == torch.float16


# ---------------------------------------------------------------------------------------------- to-nhwc
class MutateThroughFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        nn.functional.hardswish(y.flatten(1), inplace=True)  # a view of y in eager: y changes too
        return y * 2


def test_in_place_op_through_a_flatten_of_a_conv_output():
    """lower-cuda made the conv output channels-last, so ``y.flatten(1)`` was a copy and the in-place hardswish
    never reached ``y`` (max error 1.8 in fp32). Fix: the CUDA pipelines run to-nhwc, which gives every reader
    of such a value one NCHW copy made right after the conv (the flatten is a view again)."""
    model, x = MutateThroughFlatten().eval(), torch.randn(2, 3, 6, 6)
    y = cuda_pipeline_on_cpu(model, x, "cuda-fp32")(x)
    assert rel_error(y, model(x)) <= 1e-5


class FeatureMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_a_4d_output_is_cast_and_made_contiguous_in_one_copy():
    """to-nhwc's NCHW copy before a 4-d output folds into lower-cuda's cast back to fp32."""
    model, x = FeatureMap().eval(), torch.randn(2, 3, 8, 8)
    compiled = cuda_pipeline_on_cpu(model, x)
    gm = inner(compiled)
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "contiguous"
                and n.kwargs.get("memory_format", torch.contiguous_format) is torch.contiguous_format]
    last = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    assert last.target == "to" and last.kwargs["memory_format"] is torch.contiguous_format
    y = compiled(x)
    assert y.dtype == torch.float32 and y.is_contiguous() and outputs_sqnr_db(model(x), y) >= 40

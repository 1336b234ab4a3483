import copy
import io
import subprocess
import sys
import warnings

import torch
from torch import nn

import fxforge
from fxforge.backends.cpu import GemmConv1x1, OneDnnConv2d
from helpers import module_types, randomize_bn, rel_error


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = self.pw(torch.relu(self.dw(y))) + y
        feat = y  # a 4-D output: must come back in eager's (contiguous) layout
        seq = self.conv1d(y.flatten(2))  # stays eager: only Conv2d is lowered
        z = torch.relu(self.head(seq.mean(2)))
        return self.out(z), feat


def _compile(batch=2):
    model = randomize_bn(ConvNet()).eval()
    x = torch.randn(batch, 3, 15, 15)
    return model, x, fxforge.compile(model, "cpu", example_inputs=x)


def test_lowering_replaces_fused_convs_and_linear_relu():
    _, _, compiled = _compile()
    types = module_types(compiled.graph_module)
    assert types.count("OneDnnConv2d") == 3
    assert types.count("OneDnnLinear") == 1  # head (linear+relu); `out` stays on eager sgemm
    assert "Conv1d" in types and "Linear" in types
    assert "lowered 3 conv(s) and 1 linear(s)" in str(compiled.report)


def test_lowered_model_matches_eager_and_keeps_output_layout():
    model, x, compiled = _compile()
    logits, feat = compiled(x)
    ref_logits, ref_feat = model(x)
    assert rel_error((logits, feat), (ref_logits, ref_feat)) <= 1e-5
    assert feat.is_contiguous()


def test_other_batch_sizes_and_channels_last_inputs():
    model, _, compiled = _compile(batch=2)
    for x in (torch.randn(1, 3, 15, 15), torch.randn(5, 3, 15, 15).contiguous(memory_format=torch.channels_last)):
        assert rel_error(compiled(x), model(x)) <= 1e-5


def test_compiled_module_survives_deepcopy_and_torch_save():
    model, x, compiled = _compile()
    clone = copy.deepcopy(compiled)
    buf = io.BytesIO()
    torch.save(compiled, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (clone, loaded):
        assert rel_error(m(x), model(x)) <= 1e-5


def test_cpu_pipeline_is_the_documented_text():
    text = fxforge.pipeline_for("cpu")
    assert text.split(",")[-1] == "lower-cpu" and "fold-bn" in text and "fuse-conv" in text


class Activations(nn.Module):
    """Every fused activation, through the whole cpu pipeline."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1)
        self.act1, self.act2, self.act3 = nn.ReLU6(inplace=True), nn.Hardswish(), nn.SiLU()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.act3(self.c3(self.act2(self.c2(self.act1(self.c1(x))))))
        return nn.functional.hardswish(self.fc(y.mean((2, 3))))


def test_fused_activations_lower_to_onednn_post_ops():
    model = Activations().eval()
    x = torch.randn(2, 3, 12, 12) * 4  # large enough to hit relu6's upper clamp
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    gm = compiled.graph_module
    lowered = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {k: m.activation for k, m in lowered.items()} == {
        "c1": "relu6", "c2": "hardswish", "c3": "silu", "fc": "hardswish"}
    assert all(type(m).__name__.startswith("OneDnn") for m in lowered.values())
    assert rel_error(compiled(x), model(x)) <= 1e-5


class ResidualConv(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def test_conv_add_relu_on_layout_ambiguous_shapes():
    """1 channel or 1x1 maps: NCHW and NHWC strides coincide (torch 2.11's fused sum rejects these)."""
    for channels, hw in ((1, (1, 3)), (1, (5, 5)), (4, (1, 1)), (4, (3, 3))):
        model = ResidualConv(channels).eval()
        x = torch.randn(2, channels, *hw)
        compiled = fxforge.compile(model, "cpu", example_inputs=x)
        # a pointwise conv on 1x1 maps runs as a GEMM; the oneDNN module must handle these shapes all the same
        assert module_types(compiled.graph_module) == ["GemmConv1x1" if hw == (1, 1) else "OneDnnConv2d"]
        assert rel_error(compiled(x), model(x)) <= 1e-5
        onednn = OneDnnConv2d(model.conv, add=True, activation="relu", input_size=list(x.shape))
        with torch.inference_mode():
            assert rel_error(onednn(x, x), model(x)) <= 1e-5


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def test_load_state_dict_and_to_refresh_the_prepacked_weights():
    model = ConvHead().eval()
    x = torch.randn(2, 3, 5, 5)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    state = {k: v * 2 if k.endswith("conv.weight") else v for k, v in compiled.state_dict().items()}
    compiled.load_state_dict(state)
    doubled = ConvHead().eval()
    doubled.load_state_dict({**model.state_dict(), "conv.weight": model.conv.weight * 2})
    assert rel_error(compiled(x), doubled(x)) <= 1e-5
    compiled.to(torch.float32)  # a no-op conversion still leaves a runnable, correct module
    assert rel_error(compiled(x), doubled(x)) <= 1e-5


def test_conv_packs_its_weight_per_input_size():
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


def test_dilated_one_by_one_conv_runs_without_crashing():
    """oneDNN's prepacked conv segfaulted on a 1x1 conv with dilation 2, stride 3 and padding 2 over a 4x1 map
    (torch 2.14; found by a longer run of the graph fuzzer, in any input layout). Dilation of a one-tap kernel
    dimension changes nothing: OneDnnConv2d drops it. Run in a subprocess: before the fix it killed the
    interpreter."""
    code = ("import torch, fxforge; from torch import nn; torch.set_num_threads(1)\n"
            "m = nn.Sequential(nn.Conv2d(2, 10, 1, stride=3, padding=2, dilation=2)).eval()\n"
            "x = torch.randn(1, 2, 4, 1)\n"
            "c = fxforge.compile(m, 'cpu', example_inputs=x)\n"
            "assert 'OneDnnConv2d' in str(c.graph_module)\n"
            "with torch.no_grad():\n"
            "    for _ in range(20): torch.testing.assert_close(c(x), m(x))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


class SqueezeExcite(nn.Module):
    """A conv, then squeeze-excitation: two 1x1 convs on the pooled 1x1 map (a linear layer each)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = torch.nn.functional.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return y * s


def test_pointwise_convs_on_one_by_one_maps_run_as_gemms():
    model = SqueezeExcite().eval()
    x = torch.randn(2, 3, 9, 9)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, dynamic={"x": {0: "batch", 2: "h", 3: "w"}})
    types = module_types(compiled.graph_module)
    assert types.count("GemmConv1x1") == 2 and types.count("OneDnnConv2d") == 1
    assert compiled.graph_module.get_submodule("fc1").activation == "relu"  # the fused relu goes with it
    for batch in (x, torch.randn(1, 3, 5, 7), torch.randn(3, 3, 9, 9).contiguous(memory_format=torch.channels_last)):
        assert rel_error(compiled(batch), model(batch)) <= 1e-5


def test_the_gemm_conv_computes_the_conv_on_any_map_size():
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 10, 1).eval()
    x, other = torch.randn(2, 6, 3, 4), torch.randn(2, 10, 3, 4)
    gemm = GemmConv1x1(conv.weight, conv.bias, add=True, activation="hardswish")
    with torch.inference_mode():
        expected = torch.nn.functional.hardswish(conv(x) + other)
        actual = gemm(x, other)
    assert rel_error(actual, expected) <= 1e-5 and actual.is_contiguous(memory_format=torch.channels_last)


def test_squeeze_excitation_gemms_trace_to_torchscript_bit_for_bit():
    """to_torchscript checks its trace bit for bit (a traced addmm rounds differently from eager's: seed 1 shows
    it), and the GEMM's code has no shape-dependent branch for the tracer to warn about."""
    for seed in range(4):
        torch.manual_seed(seed)
        model, x = SqueezeExcite().eval(), torch.randn(2, 3, 9, 9)
        compiled = fxforge.compile(model, "cpu", example_inputs=x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            scripted = compiled.to_torchscript(x)  # raises when the trace's outputs differ from the compiled model's
        assert torch.equal(scripted(x), compiled(x))

"""to-nhwc: where the conversions go, how many, the strides values really get, and eager equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxforge
from fxforge.graph.meta import fxmeta
from fxforge.passes.to_nhwc import conversions
from fxforge.viz import as_snapshot, compare, role_of
from helpers import module_types, one_intra_op_thread, randomize_bn, reestimate_bn, rel_error

one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)

CL = torch.channels_last
GRAPH = "remove-noops,dce,normalize-inplace,normalize-relu,fold-bn,fuse-conv,fuse-linear"


def _compile(model: nn.Module, x: torch.Tensor, passes: str = "to-nhwc") -> fxforge.CompiledModule:
    """The cpu target's graph passes, then ``passes`` (to-nhwc alone: the graph before lowering)."""
    pipeline = fxforge.pipeline_for("cpu") if passes == "cpu" else f"{GRAPH},{passes}"
    return fxforge.compile(model, "cpu", example_inputs=x, pipeline=pipeline)


class _Values(fx.Interpreter):
    """Runs a graph and keeps every node's result."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        self.values[n] = out = super().run_node(n)
        return out


def _values(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict[fx.Node, object]:
    interpreter = _Values(gm)
    with torch.inference_mode():
        interpreter.run(*(x.clone() for x in inputs))
    return interpreter.values


def _assert_region_strides(gm: fx.GraphModule, *inputs: torch.Tensor) -> int:
    """Every value to-nhwc planned channels-last really has channels-last strides (one-channel and 1x1 maps
    are both layouts at once: skipped). Returns how many values were checked."""
    checked = 0
    for node, value in _values(gm, *inputs).items():
        if fxmeta(node).get("layout") != "channels_last" or _ambiguous(value.shape):
            continue
        assert value.is_contiguous(memory_format=CL) and not value.is_contiguous(), (node.name, value.stride())
        checked += 1
    return checked


def _ambiguous(shape: torch.Size) -> bool:
    return shape[1] == 1 or shape[2:].numel() == 1


def _zoo(name: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return reestimate_bn(torchvision.models.get_model(name, weights=None), [torch.randn(4, 3, 64, 64)])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_large"])
def test_zoo_models_convert_once(name: str):
    """Minimal for ResNet-18, MobileNetV2 (and MobileNetV3-Large) is ONE conversion, at the input: every op
    from the stem to the global average pooling (convs with folded BN, relu / relu6 / hardswish, max-pool,
    residual adds, the squeeze-excitation's broadcasting multiply) keeps channels-last, so nothing is
    converted in between; the head's conversion before flatten would be a no-op, because global pooling
    returns (N, C, 1, 1), which is NCHW-contiguous and channels-last at once, so none is inserted. Checked
    on the lowered cpu graph, at batch 1, with the strides every region value really has."""
    model, x = _zoo(name), torch.randn(1, 3, 64, 64)
    compiled = _compile(model, x, "cpu")
    gm = compiled.graph_module
    assert conversions(gm) == {"enter": 1}
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and "Conv" in type(gm.get_submodule(n.target)).__name__]
    assert convs and all(fxmeta(n).get("layout") == "channels_last" for n in convs)
    types = module_types(gm)
    assert types.count("OneDnnConv2d") + types.count("GemmConv1x1") == len(convs)  # all lowered (SE convs: GEMMs)
    unambiguous = [n for n in convs if not _ambiguous(n.meta["tensor_meta"].shape)]  # SE convs run on 1x1
    assert _assert_region_strides(gm, x) >= len(unambiguous) > len(convs) // 2
    with torch.inference_mode():
        assert rel_error(compiled(x), model(x)) <= 1e-4


class Features(nn.Module):
    """conv -> relu -> conv (+ residual) -> outputs: a 4-D feature map and logits through a pooled head."""

    def __init__(self, cin: int = 3) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(cin, 8, 3, padding=1), randomize_bn(nn.BatchNorm2d(8))
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.bn(self.c1(x)))
        feat = torch.relu(self.c2(y) + y)
        return feat, self.fc(feat.mean((2, 3)))


@pytest.mark.parametrize("passes", ["to-nhwc", "cpu"])
def test_interior_channels_last_and_outputs_in_eager_layout(passes: str):
    model, x = Features().eval(), torch.randn(2, 3, 9, 9)
    compiled = _compile(model, x, passes)
    gm = compiled.graph_module
    assert conversions(gm) == {"enter": 1, "exit": 1}  # the input; the feature map at the output
    assert _assert_region_strides(gm, x) >= 2
    with torch.inference_mode():
        feat, logits = compiled(x)
        assert feat.is_contiguous() and rel_error((feat, logits), model(x)) <= 1e-5


def test_outputs_channels_last_option_leaves_region_outputs_channels_last():
    model, x = Features().eval(), torch.randn(2, 3, 9, 9)
    compiled = _compile(model, x, "to-nhwc{outputs=channels_last}")
    assert conversions(compiled.graph_module) == {"enter": 1}
    with torch.inference_mode():
        feat, logits = compiled(x)
        assert feat.is_contiguous(memory_format=CL) and not feat.is_contiguous()
        assert rel_error((feat, logits), model(x)) <= 1e-5


def test_bad_outputs_option_is_a_config_error():
    with pytest.raises(fxforge.ConfigError, match="outputs="):
        _compile(Features().eval(), torch.randn(1, 3, 5, 5), "to-nhwc{outputs=nchw}")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("passes", ["to-nhwc", "cpu"])
def test_single_channel_input(batch: int, passes: str):
    """A one-channel NCHW input is channels-last too by its strides, yet a conv reading it returns NCHW: it
    enters with ``.to(memory_format=channels_last)``, which restrides it, and the convs run channels-last."""
    model, x = Features(cin=1).eval(), torch.randn(batch, 1, 9, 9)
    compiled = _compile(model, x, passes)
    gm = compiled.graph_module
    enter = [n for n in gm.graph.nodes if fxmeta(n).get("nhwc") == "enter"]
    assert [(n.target, n.kwargs) for n in enter] == [("to", {"memory_format": CL})]
    assert _assert_region_strides(gm, x) >= 2  # the conv outputs
    with torch.inference_mode():
        feat, _ = compiled(x)
        assert feat.is_contiguous() and rel_error(compiled(x), model(x)) <= 1e-5


class FlattenHead(nn.Module):
    """The head reads the last conv's output directly: ``.view`` (fails on channels-last strides) or flatten."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.view = view
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 4, 3), nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.c1(x)))
        return self.fc(y.view(y.size(0), -1) if self.view else torch.flatten(y, 1))


@pytest.mark.parametrize("view", [True, False], ids=["view", "flatten"])
@pytest.mark.parametrize("passes", ["to-nhwc", "cpu"])
def test_head_flattens_right_after_a_conv(view: bool, passes: str):
    model, x = FlattenHead(view).eval(), torch.randn(1, 3, 9, 9)
    compiled = _compile(model, x, passes)
    gm = compiled.graph_module
    assert conversions(gm) == {"enter": 1, "exit": 1}
    head = next(n for n in gm.graph.nodes if n.target in ("view", torch.flatten))
    assert fxmeta(head.args[0]).get("nhwc") == "exit"  # the head reads the NCHW copy
    with torch.inference_mode():
        assert rel_error(compiled(x), model(x)) <= 1e-5


class CatUpsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.up, self.c = nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        return self.c(F.interpolate(y, scale_factor=2.0, mode="nearest") + self.up(y))


def test_cat_and_interpolate_are_reasserted():
    """cat / interpolate / Upsample keep channels-last on this torch but not in every version and mode: their
    outputs are re-asserted (a no-op at run time when kept), so the region stays channels-last."""
    model, x = CatUpsample().eval(), torch.randn(2, 3, 8, 8)
    compiled = _compile(model, x)
    gm = compiled.graph_module
    reasserted = {str(getattr(n.args[0].target, "__name__", n.args[0].target)) for n in gm.graph.nodes
                  if fxmeta(n).get("nhwc") == "reassert"}
    assert reasserted == {"cat", "interpolate", "up"}
    assert conversions(gm) == {"enter": 1, "exit": 1, "reassert": 3}
    assert _assert_region_strides(gm, x) == 11  # x's conversion, a, b, cat, interpolate, up, add, c, 3 reasserts
    with torch.inference_mode():
        out = compiled(x)
        assert out.is_contiguous() and rel_error(out, model(x)) <= 1e-5


@pytest.mark.parametrize("case", ["features", "single-channel", "cat-upsample", "view-head", "mutated"])
def test_running_it_twice_changes_nothing(case: str):
    model, x = {"features": (Features(), torch.randn(2, 3, 9, 9)),
                "single-channel": (Features(cin=1), torch.randn(1, 1, 9, 9)),
                "cat-upsample": (CatUpsample(), torch.randn(2, 3, 8, 8)),
                "view-head": (FlattenHead(True), torch.randn(1, 3, 9, 9)),
                "mutated": (MutatesInput(), torch.randn(2, 3, 6, 6))}[case]
    once = _compile(model.eval(), x, "to-nhwc")
    twice = _compile(model.eval(), x, "to-nhwc,to-nhwc")
    assert twice.graph_module.code == once.graph_module.code
    assert conversions(once.graph_module)  # it did fire
    last = twice.report.passes[-1]
    assert last.name == "to-nhwc" and not last.modified


class MutateThroughFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        F.hardswish(y.flatten(1), inplace=True)  # flatten is a view of y in eager: y changes too
        return y * 2


class MutatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        x.mul_(2)  # the caller's tensor changes; c2 must read the doubled values
        return y + self.c2(x)


@pytest.mark.parametrize("passes", ["to-nhwc", "cpu"])
def test_in_place_ops_see_what_they_see_in_eager(passes: str):
    """A conv output mutated through a flatten of it is copied to NCHW once, right after the conv, and
    everything reads the copy (the flatten is then a view again); a mutated input is converted per reader,
    right before it reads (c1 sees x, c2 sees 2x), and the caller's tensor is mutated as in eager."""
    model, x = MutateThroughFlatten().eval(), torch.randn(1, 3, 5, 5)
    compiled = _compile(model, x, passes)
    conv = next(n for n in compiled.graph_module.graph.nodes if n.target == "conv")
    assert [fxmeta(u).get("nhwc") for u in conv.users] == ["exit"]
    with torch.inference_mode():
        assert rel_error(compiled(x), model(x)) <= 1e-5

    model, x = MutatesInput().eval(), torch.randn(2, 3, 6, 6)
    compiled = _compile(model, x, passes)
    assert conversions(compiled.graph_module) == {"enter": 2, "exit": 1}  # the sum is an output
    mine, theirs = x.clone(), x.clone()
    with torch.inference_mode():
        assert rel_error(compiled(mine), model(theirs)) <= 1e-5
    assert torch.equal(mine, theirs)


class NoConv(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.relu(x) + x, 2).flatten(1)


def test_no_conv_no_region():
    """Channels-last pays only around convs: a graph without one is left alone."""
    compiled = _compile(NoConv().eval(), torch.randn(2, 3, 6, 6))
    assert not conversions(compiled.graph_module)
    assert not compiled.report.passes[-1].modified


def test_conversions_are_layout_nodes_in_viz():
    model, x = Features().eval(), torch.randn(2, 3, 9, 9)
    compiled = _compile(model, x)
    stage = compiled.report.stage("to-nhwc")
    diff = compare(as_snapshot(compiled.report.stage_before("to-nhwc")), as_snapshot(stage))
    added = set(diff.names("added"))
    roles = {rec.name: role_of(rec) for rec in as_snapshot(stage).nodes if rec.name in added}
    assert len(roles) == 2 and set(roles.values()) == {"layout"}


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x).flatten(1), self.b(x).flatten(1)


def test_regions_share_the_conversion_of_an_input_they_both_read():
    """Two convs reading x are two regions (joined only through x, which is outside both): x enters once."""
    model, x = TwoHeads().eval(), torch.randn(2, 3, 6, 6)
    compiled = _compile(model, x)
    assert conversions(compiled.graph_module) == {"enter": 1, "exit": 2}
    assert "2 channels-last region(s)" in str(compiled.report)
    with torch.inference_mode():
        assert rel_error(compiled(x), model(x)) <= 1e-5


class ViewHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))  # needs NCHW-contiguous strides


def test_view_after_a_lowered_conv_works():
    model = ViewHead().eval()
    x = torch.randn(2, 3, 5, 5)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert rel_error(compiled(x), model(x)) <= 1e-5


class Double(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, self.conv(x)


def test_outputs_keep_the_layout_eager_gives():
    model = Double().eval()
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    for got, want in zip(compiled(x), model(x), strict=True):
        assert got.stride() == want.stride()
    plain = torch.randn(1, 3, 4, 4)
    compiled = fxforge.compile(model, "cpu", example_inputs=plain)
    assert all(out.is_contiguous() for out in compiled(plain))


class MutateThroughFlattenOneChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        F.hardswish(y.flatten(1), inplace=True)  # flatten is a view of y: hardswish changes y too
        return y * 2


def test_in_place_op_through_a_flatten_reaches_the_lowered_conv_output():
    """Found by the graph fuzzer: lower-cpu made the conv output channels-last, so ``y.flatten(1)`` became a
    copy and the in-place hardswish no longer reached ``y`` (relative error 0.6). Fix: the value is made
    NCHW-contiguous right after its producer when an in-place op mutates it through a flatten/reshape/view
    (one shared copy; to-nhwc does this now, lower-cpu did then)."""
    model = MutateThroughFlattenOneChannel().eval()
    x = torch.randn(1, 1, 5, 5)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert "OneDnnConv2d" in str(compiled.graph_module)  # still lowered
    with torch.no_grad():
        assert rel_error(compiled(x), model(x)) <= 1e-5


class ConvThenCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, 2), padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, y], 1)


def test_a_reasserted_cat_returned_as_an_output_keeps_eager_layout():
    """Found by the graph fuzzer: to-nhwc re-asserts channels-last after a cat, and gave the re-assertion node
    channels-last shape metadata; the outputs' layout is decided from that metadata (eager's), so the cat,
    returned, stayed channels-last where eager's is contiguous. Fix: to-nhwc's conversion nodes keep eager's
    metadata."""
    model, x = ConvThenCat().eval(), torch.randn(1, 1, 1, 1)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    with torch.no_grad():
        out = compiled(x)
        assert out.is_contiguous() and rel_error(out, model(x)) <= 1e-5


class OneChannelConvView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(torch.relu(x))
        return y.view(y.shape[0], -1)


def test_view_of_a_one_channel_conv_output_passes_the_layout_invariant():
    """Found by the graph fuzzer: to-nhwc inserts no NCHW copy before a view of a one-channel value (it is
    NCHW-contiguous in either layout), but its own invariant ('no view reads a channels-last value') still
    counted it and failed the compile. Fix: the invariant exempts values that are contiguous in both layouts,
    as the pass does."""
    model, x = OneChannelConvView().eval(), torch.randn(1, 1, 3, 3)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    with torch.no_grad():
        assert rel_error(compiled(x), model(x)) <= 1e-5


class OneByOneLeaves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(inplace=True)
        self.c2, self.up = nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        z = self.c2(y)
        y = self.act(y)  # in place: the conv's readers all read its NCHW copy, made right after it
        return self.up(x + y), z  # the add and conv-transpose hold no Conv2d: no region, eager layout


def test_a_one_by_one_map_leaving_a_region_is_restrided():
    """Found by the graph fuzzer: on 1x1 maps ``contiguous()`` returns a channels-last tensor as it is (it is
    contiguous in both layouts), but torch still reads its strides as channels-last, so the conv-transpose
    outside any region returned channels-last where eager's output is contiguous. Fix: to-nhwc converts values
    that are contiguous in both layouts at the example's shape with ``.to(memory_format=...)``, which restrides
    them."""
    model, x = OneByOneLeaves().eval(), torch.randn(1, 1, 1, 1)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    with torch.no_grad():
        out = compiled(x)
        assert out[0].is_contiguous() and rel_error(out, model(x)) <= 1e-5

"""fxforge.viz.render: node roles, labels and clusters in the SVG of real models at several stages."""

from __future__ import annotations

import warnings

import graphviz
import pytest
import torch
from torch import nn
from viz_helpers import nodes_with, roles_in, svg_nodes

import fxforge
from fxforge import viz
from fxforge.viz.dot import AUTO_COLLAPSE_NODES

pytestmark = pytest.mark.skipif(not viz.dot_available(), reason="Graphviz 'dot' is not installed (make graphviz)")


def svg_of(obj, tmp_path, name: str = "g.svg", **options) -> str:
    return viz.render(obj, tmp_path / name, **options).read_text()


def test_resnet18_fp32_stages_show_convs_then_fused_convs(compiled_models, tmp_path):
    report = compiled_models["resnet18-cpu"].report
    traced = svg_of(report.stage("trace"), tmp_path, "traced.svg")
    assert {"input", "output", "conv", "linear", "op"} <= roles_in(traced)
    assert "fused" not in roles_in(traced)
    conv = next(t for t in nodes_with(traced, "role-conv") if "layer1.0.conv1" in t)
    assert "Conv2d" in conv and "1x64x16x16 float32" in conv  # op, module path, shape and dtype

    fused = svg_of(report.stage("fuse-conv"), tmp_path, "fused.svg")
    texts = nodes_with(fused, "role-fused")
    assert any("FusedConv (post-ops add+relu)" in t and "= layer1_0_conv2 + layer1_0_bn2 + " in t for t in texts)
    assert not any("BatchNorm2d" in t for _, t in svg_nodes(fused))

    final = svg_of(compiled_models["resnet18-cpu"], tmp_path, "final.svg")
    assert all("OneDnnConv2d" in t for t in nodes_with(final, "role-fused"))
    assert len(nodes_with(final, "role-fused")) == 20  # every conv lowered with its folded BN / activation


def test_clusters_follow_the_module_hierarchy(compiled_models, tmp_path):
    svg = svg_of(compiled_models["resnet18-cpu"].report.stage("trace"), tmp_path)
    assert "layer1.0 : BasicBlock" in svg and "layer1 : Sequential" in svg
    assert svg.count('class="cluster module"') >= 12  # layer1..4 and their 8 blocks (and the downsamples)


def test_resnet18_int8_stages_show_quantize_dequantize_and_kernels(compiled_models, tmp_path):
    report = compiled_models["resnet18-x86"].report
    observed = svg_of(report.stage("insert-observers"), tmp_path, "observed.svg")
    observers = sum(n.hint == "observer" for n in report.stage("insert-observers").graph.nodes)
    assert len(nodes_with(observed, "role-observer")) == observers > 0  # each observer drawn as one

    reference = svg_of(report.stage("insert-qdq"), tmp_path, "qdq.svg")
    assert {"quantize", "dequantize", "fused", "input", "output"} <= roles_in(reference)
    first_q = next(t for t in nodes_with(reference, "role-quantize") if "1x3x64x64" in t)
    layer = report.quantization.layers[0]  # the input's qparams, printed on its quantize node
    assert "quint8" in first_q and f"scale {layer.scale:.4g} zp {layer.zero_point}" in first_q

    lowered = svg_of(compiled_models["resnet18-x86"], tmp_path, "lowered.svg")
    kernels = nodes_with(lowered, "role-fused")
    assert any("quantized.conv2d_relu" in t and "1x64x16x16 quantized" in t and "out scale" in t for t in kernels)
    assert any("quantized.conv2d_add_relu" in t for t in kernels)  # x86 runs residual adds inside the conv
    # the input's quantize and the output's dequantize, plus the global average pool's pair (its means get
    # qparams of their own: it runs in fp32 between them)
    quantize = nodes_with(lowered, "role-quantize")
    assert len(quantize) == 2 and "1x512x1x1" in quantize[1] and len(nodes_with(lowered, "role-dequantize")) == 2


def test_mobilenet_v2_stages(compiled_models, tmp_path):
    cpu = compiled_models["mobilenet_v2-cpu"].report
    traced = svg_of(cpu.stage("trace"), tmp_path, "traced.svg", collapse=False)
    assert {"input", "output", "conv", "linear", "op"} <= roles_in(traced)
    folded = svg_of(cpu.stage("fold-bn"), tmp_path, "folded.svg")
    assert len(nodes_with(folded, "role-fused")) == 52  # 52 conv+BN pairs
    int8 = svg_of(compiled_models["mobilenet_v2-x86"].report.stage("insert-qdq"), tmp_path, "int8.svg")
    assert {"quantize", "dequantize", "fused"} <= roles_in(int8)


def test_large_graphs_collapse_repeated_blocks(compiled_models, tmp_path):
    stage = compiled_models["mobilenet_v2-x86"].report.stage("insert-qdq")
    full = svg_nodes(svg_of(stage, tmp_path, "full.svg", collapse=False))
    auto = svg_of(stage, tmp_path, "auto.svg")
    assert len(full) > AUTO_COLLAPSE_NODES
    boxes = nodes_with(auto, "role-collapsed")
    assert boxes and any("x InvertedResidual, same ops as features." in t for t in boxes)
    assert len(svg_nodes(auto)) < len(full)
    assert not nodes_with(svg_of(compiled_models["resnet18-cpu"], tmp_path, "small.svg"), "role-collapsed")


def test_fp32_island_and_layout_roles(compiled_models, tmp_path):
    island = svg_of(compiled_models["island-x86"], tmp_path, "island.svg")
    texts = nodes_with(island, "role-fp32-island")
    assert len(texts) == 1 and "exp" in texts[0] and "fp32: no int8 implementation" in texts[0]

    class ConvOut(nn.Module):  # a 4-d output: lower-cpu gives it back in eager's NCHW layout
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.relu(self.conv(x))

    compiled = fxforge.compile(ConvOut().eval(), "cpu", example_inputs=torch.randn(1, 3, 8, 8))
    assert any("contiguous" in t for t in nodes_with(svg_of(compiled, tmp_path, "layout.svg"), "role-layout"))


def test_a_pass_can_choose_a_node_role(tmp_path):
    gm = fxforge.trace(nn.Sequential(nn.ReLU()), (torch.randn(2),)).gm
    relu = next(n for n in gm.graph.nodes if n.op == "call_module")
    relu.meta.setdefault("fxforge", {})["role"] = "layout"
    assert "layout" in roles_in(svg_of(gm, tmp_path))


def test_suffix_picks_the_format(compiled_models, tmp_path):
    compiled = compiled_models["resnet18-cpu"]
    assert viz.render(compiled, tmp_path / "g.dot").read_text().startswith("digraph")
    assert viz.render(compiled, tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert viz.render(compiled, tmp_path / "g.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(fxforge.ConfigError, match=r"\.svg, \.png, \.pdf or \.dot"):
        viz.render(compiled, tmp_path / "g.jpeg")
    with pytest.raises(fxforge.ConfigError, match="GraphModule, a CompiledModule, a report stage"):
        viz.render(nn.Linear(2, 2), tmp_path / "g.svg")


def test_without_dot_a_dot_file_is_written_with_a_warning(compiled_models, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not viz.dot_available()
    with pytest.warns(viz.GraphvizNotFoundWarning, match="dot -Tsvg .*g.dot -o .*g.svg"):
        written = viz.render(compiled_models["resnet18-cpu"], tmp_path / "g.svg")
    assert written == tmp_path / "g.dot" and written.read_text().startswith("digraph")
    assert not (tmp_path / "g.svg").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # .dot output needs no dot program
        viz.render(compiled_models["resnet18-cpu"], tmp_path / "h.dot")


def test_to_dot_and_dump_dir_use_the_styled_graph(compiled_models):
    gm = compiled_models["resnet18-cpu"].graph_module
    source = viz.to_dot(gm, "final")
    assert source.startswith("digraph") and "role-fused" in source and "final" in source
    g = viz.to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes) and g.has_edge("x", next(iter(g.successors("x"))))


def _oddly_named_model() -> nn.Module:
    """A submodule named ``x>`` of a class named ``<<b`` returning a tuple (no shape line): its node's label
    reads ``<<b`` ... ``x>``, which Graphviz would take for an HTML-like label."""
    odd = type("<<b", (nn.Module,), {"forward": lambda self, x: (x * 2, x)})

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module("x>", odd())
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = getattr(self, "x>")(x)
            return self.lin(a + b)

    return Model().eval()


@pytest.mark.skipif(not viz.dot_available(), reason="needs Graphviz's dot program")
def test_labels_made_of_angle_brackets_are_drawn_as_text(tmp_path):
    model = _oddly_named_model()
    leaf = type(model.get_submodule("x>"))
    compiled = fxforge.compile(model, "cpu", example_inputs=torch.randn(1, 4), leaf_modules=[leaf])
    with warnings.catch_warnings():
        warnings.simplefilter("error", viz.GraphvizWarning)
        svg = viz.render(compiled.report.stage("trace"), tmp_path / "g.svg").read_text()
    assert "&lt;&lt;b" in svg and "x&gt;" in svg
    page = compiled.report.to_html(tmp_path / "r.html").read_text()
    assert "failed on this graph" not in page and "<svg" in page


def test_when_dot_fails_the_dot_text_is_written_with_its_error(compiled_models, tmp_path, monkeypatch):
    def failing_pipe(self, *args, **kwargs):
        raise graphviz.CalledProcessError(1, ["dot", "-Tsvg"], stderr=b"Error: <stdin>: syntax error in line 6\n")

    monkeypatch.setattr(graphviz.Digraph, "pipe", failing_pipe)
    with pytest.warns(viz.GraphvizFailedWarning, match="syntax error in line 6"):
        written = viz.render(compiled_models["resnet18-cpu"], tmp_path / "g.svg")
    assert written == tmp_path / "g.dot" and written.read_text().startswith("digraph")
    page = compiled_models["resnet18-cpu"].report.to_html(tmp_path / "r.html").read_text()
    assert "failed on this graph: Error: &lt;stdin&gt;: syntax error" in page and "DOT text" in page

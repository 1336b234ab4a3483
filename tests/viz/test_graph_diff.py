"""fxforge.viz.diff / compare: what a pass changed, matched by the provenance passes record; report stages."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn
from viz_helpers import nodes_with

import fxforge
from fxforge import viz
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.report import CompileReport

needs_dot = pytest.mark.skipif(not viz.dot_available(), reason="Graphviz 'dot' is not installed (make graphviz)")


def test_fold_bn_removes_every_bn_into_the_conv_that_feeds_it(compiled_models):
    report = compiled_models["resnet18-cpu"].report
    before, after = report.stage_before("fold-bn").graph, report.stage("fold-bn").graph
    d = viz.compare(before, after)
    bns = {n.name: n.inputs[0] for n in before.nodes if n.kind == "BatchNorm2d"}
    assert len(bns) == 20
    assert set(d.names("removed")) == set(bns) and d.merged_into == bns
    assert set(d.names("rewritten")) == set(bns.values())  # the convs, same names, BN in their origins
    assert d.names("added") == []
    conv = after.by_name()["conv1"]
    assert conv.origins == ("conv1", "bn1") and conv.rewritten_by == "fold-bn"


@needs_dot
def test_fold_bn_diff_svg_highlights_removed_bns_and_rewritten_convs(compiled_models, tmp_path):
    report = compiled_models["resnet18-cpu"].report
    svg = viz.diff(report.stage_before("fold-bn"), report.stage("fold-bn"), tmp_path / "fold-bn.svg").read_text()
    removed, rewritten = nodes_with(svg, "status-removed"), nodes_with(svg, "status-rewritten")
    assert len(removed) == 20 and all("BatchNorm2d" in t and "removed: folded into" in t for t in removed)
    assert len(rewritten) == 20 and all("Conv2d" in t and "rewritten by fold-bn" in t for t in rewritten)
    assert "0 added, 20 removed, 20 rewritten" in svg
    assert any("layer1.0.bn1" in t and "folded into layer1_0_conv1" in t for t in removed)
    dot = viz.diff(report.stage_before("fold-bn"), report.stage("fold-bn"), tmp_path / "fold-bn.dot").read_text()
    assert dot.count("rank=same") == 20  # each removed BN drawn level with the conv that absorbed it


def test_fuse_conv_replaces_conv_and_relu_with_a_new_node(compiled_models):
    report = compiled_models["resnet18-cpu"].report
    before, after = report.stage_before("fuse-conv").graph, report.stage("fuse-conv").graph
    d = viz.compare(before, after)
    relu = next(n.name for n in before.nodes if n.inputs == ("conv1",))
    fused = next(n.name for n in after.nodes if n.kind == "FusedConv" and n.target == "conv1")
    assert fused != "conv1" and d.replaces[fused] == ("conv1", relu)  # a new node standing for both
    assert d.merged_into == {**d.merged_into, "conv1": fused, relu: fused}


def test_insert_qdq_adds_quantize_nodes_and_removes_observers(compiled_models):
    report = compiled_models["resnet18-x86"].report
    before, after = report.stage_before("insert-qdq").graph, report.stage("insert-qdq").graph
    d = viz.compare(before, after)
    added = [after.by_name()[n].kind for n in d.names("added")]
    assert {"quantize_per_tensor", "dequantize"} <= set(added)
    observers = {n.name for n in before.nodes if n.hint == "observer"}
    assert observers and observers <= set(d.names("removed"))
    # one quantize node per quantization point of the report (observed values, and requantized shares)
    assert added.count("quantize_per_tensor") == len(report.quantization.layers) >= len(observers)


def test_diff_of_a_graph_with_itself_changes_nothing(compiled_models):
    stage = compiled_models["resnet18-x86"].report.stage("lower-x86")
    d = viz.compare(stage.graph, stage.graph)
    assert set(d.status.values()) == {"unchanged"} and d.summary() == "0 added, 0 removed, 0 rewritten"


@needs_dot
def test_diff_takes_graph_modules(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxforge.trace(model, (x,)).gm
    before = copy.deepcopy(gm)  # passes rewrite in place: keep a copy (or use the report's stages)
    ctx = PassContext((x,), CompileReport("cpu", "fold-bn", torch.__version__), properties={"eval"})
    ctx.propagate(gm)
    fxforge.PassManager.from_text("fold-bn").run(gm, ctx)
    svg = viz.diff(before, gm, tmp_path / "d.svg").read_text()
    assert len(nodes_with(svg, "status-removed")) == 1 and len(nodes_with(svg, "status-rewritten")) == 1


def test_stages_are_kept_for_changing_passes_only(compiled_models):
    report = compiled_models["resnet18-x86"].report
    assert [s.after for s in report.stages] == ["trace"] + [p.spec for p in report.passes if p.modified]
    assert [len(s.graph) for s in report.stages[1:]] == [p.nodes_after for p in report.passes if p.modified]
    assert report.stage("dce").after == "trace"  # dce changed nothing: the graph is the traced one
    assert report.stage("calibrate") is report.stage("insert-observers")
    assert report.stage_before("calibrate") is report.stage("insert-observers")  # calibrate changed nothing
    assert report.stage_before("insert-qdq") is report.stage("insert-observers")
    fuse_conv = next(p.spec for p in report.passes if p.name == "fuse-conv")  # e.g. fuse-conv{post_ops=add+relu}
    assert fuse_conv != "fuse-conv" and report.stage(fuse_conv) is report.stage("fuse-conv")
    with pytest.raises(fxforge.ConfigError, match="no pass 'fold_bn' ran.*Did you mean 'fold-bn'"):
        report.stage("fold_bn")


def test_stages_stay_out_of_the_json_and_pickle(compiled_models, tmp_path):
    report = compiled_models["resnet18-cpu"].report
    assert "stages" not in report.to_dict()
    assert json.loads((report.save(tmp_path) / "report.json").read_text())["target"] == "cpu"
    again = pickle.loads(pickle.dumps(report))
    assert again.stages == report.stages and again.stage("fold-bn").graph.by_name()["conv1"].origins == ("conv1", "bn1")

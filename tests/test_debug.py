"""fxforge.debug.compare (per-layer errors) and fxforge.debug.bisect (the first pass that departs)."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import batches, toy_model
from tiny_bert import tiny_bert
from torch import fx

import fxforge
from fxforge.pipeline.fragments import with_options
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
needs_int8 = pytest.mark.skipif(INT8 is None, reason="no int8 engine in this torch build")
X = batches(1, seed=7)[0]


def outlier_weight_model() -> torch.nn.Module:
    """The toy net with one output channel of conv2 weighing 50x the others: with per-tensor weights, that
    channel sets the scale and the other channels round to a handful of levels."""
    model = toy_model()
    with torch.no_grad():
        model.conv2.weight[0] *= 50
    return model


@needs_int8
def test_compare_lists_every_layer_by_module_path_most_damaging_first():
    model = outlier_weight_model()
    compiled = fxforge.compile(model, INT8, example_inputs=X, calibration=batches(4),
                               quant_config=fxforge.QuantConfig().for_name("conv2", per_channel=False))
    table = fxforge.debug.compare(model, compiled, X)
    layers = [r.layer for r in table.rows]
    assert {"conv1", "conv2", "fc", "<input>"} <= set(layers)
    assert layers[0] == "conv2" and table.rows[0].op.startswith("Conv2d+BatchNorm2d")  # x86: +add+relu too
    local = [r.local_sqnr_db for r in table.rows if r.local_sqnr_db is not None]
    assert local == sorted(local)
    fc = next(r for r in table.rows if r.layer == "fc")  # the output value: its SQNR is the model's
    assert fc.sqnr_db == pytest.approx(table.output_sqnr_db, abs=1e-6)
    assert table.output_sqnr_db == pytest.approx(compiled.report.quantization.model_sqnr_db, abs=1e-6)
    assert compiled.report.comparison is table and "per-layer error vs fp32" in str(compiled.report)
    assert compiled.report.to_dict()["comparison"]["rows"][0]["layer"] == "conv2"


@needs_int8
def test_compare_without_the_weight_outlier_does_not_blame_conv2():
    model = toy_model()
    compiled = fxforge.compile(model, INT8, example_inputs=X, calibration=batches(4),
                               quant_config=fxforge.QuantConfig().for_name("conv2", per_channel=False))
    rows = fxforge.debug.compare(model, compiled, X).rows
    conv2 = next(r for r in rows if r.layer == "conv2")
    assert conv2.local_sqnr_db > 25


class InPlaceActivation(torch.nn.Module):
    """A conv whose int8 output feeds an in-place hardswish: a value captured without a copy is overwritten."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = torch.nn.Hardswish(inplace=True)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)))


@needs_int8
def test_report_cum_db_and_compare_give_one_answer_per_layer():
    model = InPlaceActivation().eval()
    compiled = fxforge.compile(model, INT8, example_inputs=X, calibration=batches(2))
    table = fxforge.debug.compare(model, compiled, X, attach=False)
    by_node = {r.node: r for r in table.rows}
    checked = 0
    for record in compiled.report.quantization.layers:
        row = by_node.get(record.node)
        if row is None or record.sqnr_db is None:
            continue
        # the report measures the int8 reference graph, compare the lowered one: equal up to kernel rounding
        assert abs(record.sqnr_db - row.sqnr_db) <= 1.0, (record.layer, record.sqnr_db, row.sqnr_db)
        checked += 1
    assert checked >= 2


def test_compare_on_an_fp32_target_finds_only_rounding():
    model = toy_model()
    compiled = fxforge.compile(model, "cpu", example_inputs=X)
    table = fxforge.debug.compare(model, compiled, X, attach=False)
    assert compiled.report.comparison is None
    assert table.rows and all(r.local_sqnr_db > 80 and r.max_abs_error < 1e-4 for r in table.rows)


@needs_int8
def test_compare_works_on_a_loaded_model(tmp_path):
    model = toy_model()
    compiled = fxforge.compile(model, INT8, example_inputs=X, calibration=batches(4))
    loaded = fxforge.load(fxforge.save(compiled, tmp_path / "m.fxf"))
    before = fxforge.debug.compare(model, compiled, X, attach=False)
    after = fxforge.debug.compare(model, loaded, X, attach=False)
    assert after == before


@fxforge.graph_pass(name="corrupt-conv-weights")
def corrupt_conv_weights(gm: fx.GraphModule, ctx, layer: str = "") -> bool:
    """The planted defect: flips the sign of half of one layer's output channels."""
    module = gm.get_submodule(layer)
    conv = getattr(module, "conv", getattr(module, "linear", module))  # inside a fused module
    with torch.no_grad():
        conv.weight[: conv.weight.shape[0] // 2] *= -1
    return True


def with_defect(pipeline: str, after: str, layer: str) -> str:
    passes = pipeline.split(",")
    passes.insert(passes.index(after) + 1, f"corrupt-conv-weights{{layer={layer}}}")
    return ",".join(passes)


def test_bisect_names_the_planted_pass_and_node_in_an_fp32_pipeline():
    model = toy_model()
    pipeline = with_defect(fxforge.pipeline_for("cpu"), "fold-bn", "conv2")
    result = fxforge.debug.bisect(model, "cpu", X, pipeline=pipeline)
    assert result.found and result.pass_name == "corrupt-conv-weights"
    assert result.pass_spec == "corrupt-conv-weights{layer=conv2}"
    assert (result.node, result.layer) == ("conv2", "conv2")
    assert [s.ok for s in result.stages] == [True] * result.pass_index + [False]
    assert "corrupt-conv-weights" in str(result) and "conv2" in str(result)
    with pytest.raises(AssertionError):  # the defect is real: compiling with it changes the output
        torch.testing.assert_close(fxforge.compile(model, "cpu", example_inputs=X, pipeline=pipeline)(X), model(X))


@needs_int8
@pytest.mark.parametrize("layer", ["conv1", "fc"])
def test_bisect_names_the_planted_pass_and_node_after_quantization(layer):
    model = toy_model()
    pipeline = with_defect(fxforge.pipeline_for(INT8), "insert-qdq", layer)
    result = fxforge.debug.bisect(model, INT8, X, pipeline=pipeline, calibration=batches(4))
    assert result.pass_name == "corrupt-conv-weights" and result.layer == layer
    assert result.stages[-1].check == "SQNR dB >=" and not result.stages[-1].ok
    assert all(s.ok for s in result.stages[:-1])


@needs_int8
@pytest.mark.parametrize("target", ["cpu", INT8])
def test_bisect_of_a_clean_pipeline_finds_nothing(target):
    kwargs = {"calibration": batches(4)} if target != "cpu" else {}
    result = fxforge.debug.bisect(toy_model(), target, X, **kwargs)
    assert not result.found and result.node is None
    assert [s.spec for s in result.stages] == fxforge.pipeline_for(target).split(",")
    assert "every pass kept the output" in str(result)


@needs_int8
def test_bisect_checks_do_not_feed_the_observers():
    """Running the observed graph on the example inputs would add them to the calibration statistics."""
    model, x = toy_model(), batches(1, seed=8, scale=3.0)[0]  # far outside the calibration range
    # x86 picks each layer's weight packing by timing it, so two compiles may round differently: fix the choice
    pipeline = fxforge.pipeline_for(INT8)
    if INT8 == "x86":
        pipeline = with_options(pipeline, "lower-x86", autotune=False)
    result = fxforge.debug.bisect(model, INT8, x, calibration=batches(4), min_sqnr_db=0, pipeline=pipeline)
    compiled = fxforge.compile(model, INT8, example_inputs=x, calibration=batches(4), pipeline=pipeline)
    assert not result.found and result.stages[-1].spec.startswith(f"lower-{INT8}")
    assert result.stages[-1].value == pytest.approx(compiled.report.quantization.model_sqnr_db, abs=1e-9)


@fxforge.graph_pass(name="break-the-graph")
def break_the_graph(gm: fx.GraphModule, ctx) -> bool:
    """Makes the first linear's input the wrong shape."""
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.flatten)
    node.args = (node.args[0], 2)
    return True


def test_bisect_names_a_pass_after_which_the_model_no_longer_runs():
    pipeline = "remove-noops,break-the-graph," + fxforge.pipeline_for("cpu").split(",", 1)[1]
    result = fxforge.debug.bisect(toy_model(), "cpu", X, pipeline=pipeline)
    assert result.pass_name == "break-the-graph" and result.stages[-1].check == "failed"
    assert "Error" in result.detail


@needs_int8
def test_compare_takes_keyword_inputs_of_an_exported_bert():
    model, inputs = tiny_bert()
    compiled = fxforge.compile(model, INT8, example_inputs=inputs, quantization="dynamic")
    assert compiled.report.front_end == "export"
    table = fxforge.debug.compare(model, compiled, inputs, attach=False)
    layers = {row.layer for row in table.rows}
    assert "encoder.layer.1.output.dense" in layers and "pooler.dense" in layers
    quantized = [row for row in table.rows if row.layer.endswith(".query") and row.local_sqnr_db is not None]
    assert quantized and all(10.0 < row.local_sqnr_db < 999.0 for row in quantized)  # int8 rounding, not exact
    whole = outputs_sqnr_db(model(**inputs), compiled(**inputs))
    assert table.output_sqnr_db == pytest.approx(whole, abs=0.5)


def test_bisect_takes_keyword_inputs_and_names_the_planted_pass_in_bert():
    model, inputs = tiny_bert()
    layer = "encoder.layer.1.output.dense"
    pipeline = with_defect(fxforge.pipeline_for("cpu"), "fold-bn", layer)
    result = fxforge.debug.bisect(model, "cpu", inputs, pipeline=pipeline)
    assert result.pass_spec == f"corrupt-conv-weights{{layer={layer}}}"
    assert result.layer == layer
    assert [s.ok for s in result.stages] == [True] * result.pass_index + [False]
    clean = fxforge.debug.bisect(model, "cpu", inputs)
    assert not clean.found and len(clean.stages) == len(fxforge.pipeline_for("cpu").split(","))

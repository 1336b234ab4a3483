import pytest
import torch
from torch import fx, nn

import fxforge
from fxforge.pipeline.instruments import NumericCheck, TimingInstrument
from fxforge.pipeline.report import CompileReport
from helpers import randomize_bn, rel_error


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _ctx(gm, x, props=("eval",)):
    report = CompileReport("cpu", "", torch.__version__)
    with torch.inference_mode():
        ref = gm(x)
    ctx = fxforge.PassContext((x,), report, properties=set(props), reference_outputs=ref)
    ctx.shapes(gm)
    return ctx


def _traced():
    return fx.symbolic_trace(Tiny().eval())


@fxforge.graph_pass(name="test-negate-output")
def negate_output(gm, ctx, factor: float = -1.0):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        neg = gm.graph.call_function(torch.mul, (out.args[0], factor))
    out.args = (neg,)
    return True


@fxforge.graph_pass(name="test-crash")
def crash(gm, ctx):
    raise RuntimeError("boom")


@fxforge.graph_pass(name="test-break-graph")
def break_graph(gm, ctx):
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    conv.prepend(next(iter(conv.users)))  # a user before its input: not topologically ordered
    return True


@fxforge.graph_pass(name="test-needs-folded", requires=("bn-folded",))
def needs_folded(gm, ctx):
    return False


def test_failing_pass_is_named_with_the_passes_before_it():
    x = torch.randn(1, 3, 8, 8)
    gm = _traced()
    pm = fxforge.PassManager.from_text("remove-noops,test-crash")
    with pytest.raises(fxforge.PassError, match="'test-crash' failed with RuntimeError: boom.*remove-noops") as info:
        pm.run(gm, _ctx(gm, x))
    assert info.value.pass_name == "test-crash"
    assert info.value.ran_before == ["remove-noops"]


def test_graph_that_does_not_lint_is_caught_after_the_pass():
    x = torch.randn(1, 3, 8, 8)
    gm = _traced()
    with pytest.raises(fxforge.PassError, match="'test-break-graph' left a graph that does not verify"):
        fxforge.PassManager.from_text("test-break-graph").run(gm, _ctx(gm, x))


def test_missing_requirement_names_the_providing_pass():
    x = torch.randn(1, 3, 8, 8)
    gm = _traced()
    with pytest.raises(fxforge.PassError, match="requires \\['bn-folded'\\].*provided by fold-bn"):
        fxforge.PassManager.from_text("test-needs-folded").run(gm, _ctx(gm, x))
    gm = _traced()
    fxforge.PassManager.from_text("fold-bn,test-needs-folded").run(gm, _ctx(gm, x))


def test_numeric_check_names_the_first_pass_that_changes_the_output():
    x = torch.randn(1, 3, 8, 8)
    gm = _traced()
    pm = fxforge.PassManager.from_text("fold-bn,test-negate-output,dce", instruments=[NumericCheck()])
    with pytest.raises(fxforge.NumericMismatchError, match="'test-negate-output' changed the model output") as info:
        pm.run(gm, _ctx(gm, x))
    assert info.value.ran_before == ["fold-bn"]


def test_numeric_check_passes_correct_passes_and_timing_records_each_pass():
    x = torch.randn(1, 3, 8, 8)
    gm = _traced()
    ctx = _ctx(gm, x)
    pm = fxforge.PassManager.from_text("fold-bn,fuse-conv,dce", instruments=[TimingInstrument(), NumericCheck()])
    pm.run(gm, ctx)
    records = ctx.report.passes
    assert [r.name for r in records] == ["fold-bn", "fuse-conv", "dce"]
    assert records[0].modified and records[0].nodes_after < records[0].nodes_before
    assert records[2].modified is False


def test_graph_pass_options_come_from_keyword_defaults():
    cls = fxforge.registered_passes()["test-negate-output"]
    assert cls().factor == -1.0
    assert str(cls(factor=2.0).spec()) == "test-negate-output{factor=2.0}"
    with pytest.raises(fxforge.ConfigError, match="expected float"):
        fxforge.PassManager.from_text("test-negate-output{factor=big}")


def test_dump_after_change_writes_code_and_dot_for_changing_passes_only(tmp_path):
    model = Tiny().eval()
    fxforge.compile(model, "cpu", example_inputs=torch.randn(1, 3, 8, 8), dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith("fold-bn.py") for n in names) and any(n.endswith("fold-bn.dot") for n in names)
    assert not any("remove-noops" in n for n in names)  # nothing to remove: not dumped
    assert "digraph" in next(tmp_path.glob("*fold-bn.dot")).read_text()


class ConvBnSilu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_verify_none_still_regenerates_the_code_after_each_pass():
    model = randomize_bn(ConvBnSilu()).eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, verify="none")
    assert rel_error(compiled(x), model(x)) <= 1e-5


@fxforge.graph_pass(name="test-break-runtime")
def break_runtime(gm, ctx):
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    conv.args = (conv.args[0], conv.args[0])  # a conv with two inputs: lints fine, fails when run
    return True


def test_a_graph_that_lints_but_does_not_run_is_a_typed_error_naming_the_pass():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(fxforge.CompileError, match="failed on the example inputs.*verify='numeric'"):
        fxforge.compile(Tiny().eval(), "cpu", example_inputs=x, pipeline="test-break-runtime")
    with pytest.raises(fxforge.NumericMismatchError, match="after pass 'test-break-runtime' the model no longer runs"):
        fxforge.compile(Tiny().eval(), "cpu", example_inputs=x, pipeline="test-break-runtime", verify="numeric")

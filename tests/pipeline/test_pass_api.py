"""The public pass API: user passes by name, extra_passes, requirement errors, options, plugins."""

import importlib
import sys
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxforge
from fxforge import patterns as P
from fxforge.pipeline import pass_api
from helpers import randomize_bn


class Swish(nn.Module):
    """conv -> bn -> x * sigmoid(x), twice: fuse-conv can only absorb the activation once it is one op."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = y * torch.sigmoid(y)
        z = self.bn2(self.conv2(y))
        return z * torch.sigmoid(z)


@fxforge.graph_pass(name="test-user-silu", requires="eval")
def user_silu(gm, ctx):
    """A user pass defined here, registered by the decorator."""
    return P.rewrite(gm, P.Rule(lambda x: x * torch.sigmoid(x), lambda x: torch.nn.functional.silu(x)), ctx)


def _model_and_input():
    return randomize_bn(Swish()).eval(), torch.randn(2, 3, 8, 8)


def _fused_post_ops(compiled):
    gm = compiled.graph_module
    return [getattr(gm.get_submodule(n.target), "post_ops", None) for n in gm.graph.nodes if n.op == "call_module"]


def test_user_pass_runs_by_name_from_pipeline_text():
    model, x = _model_and_input()
    compiled = fxforge.compile(model, "cpu", example_inputs=x, pipeline="fold-bn,test-user-silu,fuse-conv")
    assert [r.name for r in compiled.report.passes] == ["fold-bn", "test-user-silu", "fuse-conv"]
    assert compiled.report.passes[1].matches == {"mul(x, sigmoid(x)) -> silu(x)": 2}
    assert _fused_post_ops(compiled) == ["silu", "silu"]
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_user_pass_slots_into_a_target_pipeline_with_extra_passes():
    model, x = _model_and_input()
    plain = fxforge.compile(model, "cpu", example_inputs=x)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, extra_passes={"after:fold-bn": [user_silu]})
    names = [r.name for r in compiled.report.passes]
    assert names[names.index("fold-bn") + 1] == "test-user-silu"
    assert compiled.pipeline == fxforge.pipeline_for("cpu").replace("fold-bn", "fold-bn,test-user-silu")
    assert len(list(compiled.graph_module.graph.nodes)) < len(list(plain.graph_module.graph.nodes))
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@fxforge.graph_pass(name="test-tag", options={"label": "x"})
def tag(gm, ctx, **options):
    """Leaves the graph alone; notes its option (``options=`` declares it, ``**options`` receives it)."""
    ctx.note(f"tag {options['label']}")
    return False


def test_extra_passes_anchors_accept_classes_instances_and_text_in_order():
    model, x = _model_and_input()
    extra = {"start": tag(label="a"), "before:fuse-conv": [tag(label="b"), "test-tag{label=c}"], "end": tag}
    compiled = fxforge.compile(model, "cpu", example_inputs=x, pipeline="fold-bn,fuse-conv", extra_passes=extra)
    assert compiled.pipeline == "test-tag{label=a},fold-bn,test-tag{label=b},test-tag{label=c},fuse-conv,test-tag"
    assert [r.notes for r in compiled.report.passes if r.name == "test-tag"] == [["tag a"], ["tag b"], ["tag c"],
                                                                                  ["tag x"]]


def test_extra_passes_errors_name_the_anchor_and_the_choices():
    model, x = _model_and_input()
    with pytest.raises(fxforge.ConfigError, match="unknown anchor 'afterwards'.*'before:<pass>'"):
        fxforge.compile(model, "cpu", example_inputs=x, extra_passes={"afterwards": [user_silu]})
    with pytest.raises(fxforge.ConfigError, match="'after:fold-bnn' names no pass .*Did you mean 'fold-bn'"):
        fxforge.compile(model, "cpu", example_inputs=x, extra_passes={"after:fold-bnn": [user_silu]})
    with pytest.raises(fxforge.ConfigError, match="42 is not a pass"):
        fxforge.compile(model, "cpu", example_inputs=x, extra_passes={"end": [42]})
    with pytest.raises(fxforge.ConfigError, match="unknown pass 'test-no-such-pass'"):
        fxforge.compile(model, "cpu", example_inputs=x, extra_passes={"end": "test-no-such-pass"})


@fxforge.graph_pass(name="test-provide-flag", provides=("test-flag",))
def provide_flag(gm, ctx):
    return False


@fxforge.graph_pass(name="test-clobber-flag", invalidates=("test-flag",))
def clobber_flag(gm, ctx):
    return False


@fxforge.graph_pass(name="test-need-flag", requires=("test-flag",))
def need_flag(gm, ctx):
    raise AssertionError("must not run: its requirement does not hold")


def test_invalidated_requirement_names_the_requiring_and_the_invalidating_pass():
    model, x = _model_and_input()
    with pytest.raises(fxforge.PassError) as info:
        fxforge.compile(model, "cpu", example_inputs=x, pipeline="test-provide-flag,test-clobber-flag,test-need-flag")
    message = str(info.value)
    assert "pass 'test-need-flag' requires ['test-flag']" in message
    assert "invalidated by 'test-clobber-flag' (it held after 'test-provide-flag')" in message
    assert info.value.pass_name == "test-need-flag"
    assert info.value.ran_before == ["test-provide-flag", "test-clobber-flag"]


def test_missing_requirement_names_the_pass_that_provides_it():
    with pytest.raises(fxforge.PassError, match="'test-need-flag' requires.*provided by test-provide-flag"):
        fxforge.PassManager.from_text("test-need-flag").check({"eval"})
    fxforge.PassManager.from_text("test-provide-flag,test-need-flag").check({"eval"})


def test_builtin_pipeline_order_errors_name_both_passes_before_anything_runs():
    class Untraceable(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: tracing would fail with a TraceError
                return x
            return -x

    with pytest.raises(fxforge.PassError, match="'fuse-conv' requires.*invalidated by 'remove-noops'"):
        fxforge.compile(Untraceable().eval(), "cpu", example_inputs=torch.randn(2),
                        pipeline="fold-bn,remove-noops,fuse-conv")


@fxforge.register_pass
@dataclass(frozen=True)
class ScaleOutput(fxforge.Pass):
    """A Pass subclass with an option: multiplies the output by ``factor``."""

    name = "test-scale-output"
    requires = "eval"  # a single property, as a string
    factor: float = 1.0

    def __call__(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            out.args = (gm.graph.call_function(torch.mul, (out.args[0], self.factor)),)
        return fxforge.PassResult(gm, modified=True)


def test_pass_subclass_options_from_text_and_as_an_instance():
    assert ScaleOutput.requires == frozenset({"eval"})
    model, x = nn.Linear(3, 3).eval(), torch.randn(2, 3)
    by_text = fxforge.compile(model, "cpu", example_inputs=x, pipeline="test-scale-output{factor=3.0}")
    by_instance = fxforge.compile(model, "cpu", example_inputs=x, pipeline="dce",
                                  extra_passes={"end": ScaleOutput(factor=3.0)})
    assert by_instance.pipeline == "dce,test-scale-output{factor=3.0}"
    for compiled in (by_text, by_instance):
        torch.testing.assert_close(compiled(x), model(x) * 3.0)


def test_graph_pass_options_must_reach_the_function_and_none_is_not_an_answer():
    with pytest.raises(fxforge.ConfigError, match="declares option 'level' but .* has no parameter 'level'"):
        fxforge.graph_pass(name="test-bad-options", options={"level": 1})(lambda gm, ctx: False)

    @fxforge.graph_pass(name="test-forgot-return")
    def forgot(gm, ctx):
        pass

    with pytest.raises(fxforge.ConfigError, match="'test-forgot-return'.*returned None: return True when"):
        fxforge.compile(nn.Linear(2, 2).eval(), "cpu", example_inputs=torch.randn(1, 2), pipeline="test-forgot-return")


def _write_plugin(root, dist, module, entry_points, source):
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fxforge.passes]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points))


@pytest.fixture
def fresh_plugins(monkeypatch, tmp_path):
    """A directory on sys.path for tiny installed distributions, and the plugin scan not yet done."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(pass_api._plugins, "loaded", False)
    importlib.invalidate_caches()
    return tmp_path


def test_plugin_pass_is_found_through_entry_points(fresh_plugins):
    _write_plugin(fresh_plugins, "fxforge_test_plugin", "fxforge_test_plugin", [("plugin", "fxforge_test_plugin")], """
        import fxforge

        @fxforge.graph_pass(name="test-plugin-pass")
        def plugin_pass(gm, ctx, level: int = 0):
            ctx.note(f"plugin ran at level {level}")
            return False
        """)
    assert "test-plugin-pass" not in pass_api._REGISTRY  # nothing imported it yet
    compiled = fxforge.compile(nn.Linear(2, 2).eval(), "cpu", example_inputs=torch.randn(1, 2),
                               pipeline="test-plugin-pass{level=2}")
    assert compiled.report.passes[0].notes == ["plugin ran at level 2"]


def test_plugin_entry_point_may_name_a_pass_class(fresh_plugins):
    _write_plugin(fresh_plugins, "fxforge_test_plugin_cls", "fxforge_test_plugin_cls",
                  [("cls", "fxforge_test_plugin_cls:Listed")], """
        from dataclasses import dataclass
        import fxforge

        @dataclass(frozen=True)
        class Listed(fxforge.Pass):  # not registered by its module: the entry point registers it
            name = "test-plugin-listed"

            def __call__(self, gm, ctx):
                return fxforge.PassResult(gm, False)
        """)
    assert fxforge.registered_passes()["test-plugin-listed"].__name__ == "Listed"


def test_broken_plugin_warns_with_its_name_and_does_not_break_the_registry(fresh_plugins):
    _write_plugin(fresh_plugins, "fxforge_test_broken", "fxforge_test_broken", [("broken", "fxforge_test_broken")],
                  "raise ImportError('needs a library that is not installed')\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        passes = fxforge.registered_passes()
    assert "fold-bn" in passes
    messages = [str(w.message) for w in caught if issubclass(w.category, fxforge.errors.PluginWarning)]
    assert len(messages) == 1
    assert "plugin 'broken' (fxforge_test_broken) from distribution 'fxforge_test_broken'" in messages[0]
    assert "needs a library that is not installed" in messages[0]


def test_redefining_a_pass_replaces_it_and_a_clash_is_an_error():
    def define():
        @fxforge.graph_pass(name="test-redefined")
        def redefined(gm, ctx):
            return False

        return redefined

    first, second = define(), define()  # same module and qualname: the second replaces the first
    assert first is not second and fxforge.registered_passes()["test-redefined"] is second
    with pytest.raises(fxforge.ConfigError, match="already registered.*another name"):
        fxforge.graph_pass(name="fold-bn")(lambda gm, ctx: False)


def _two_plugins(root):
    for name in ("alpha", "beta"):
        _write_plugin(root, f"fxforge_test_{name}", f"fxforge_test_{name}", [(name, f"fxforge_test_{name}")], f"""
            import fxforge

            @fxforge.graph_pass(name="test-plugin-{name}")
            def plugin_pass(gm, ctx):
                return False
            """)


@pytest.mark.parametrize(("setting", "loaded"), [("0", set()), ("beta", {"beta"}), ("alpha, beta", {"alpha", "beta"}),
                                                 ("1", {"alpha", "beta"})])
def test_fxforge_plugins_limits_which_entry_points_load(fresh_plugins, monkeypatch, setting, loaded):
    _two_plugins(fresh_plugins)
    monkeypatch.setattr(pass_api, "_REGISTRY", dict(pass_api._REGISTRY))  # each case imports them afresh
    for name in ("alpha", "beta"):
        monkeypatch.setitem(sys.modules, f"fxforge_test_{name}", None)
        del sys.modules[f"fxforge_test_{name}"]
    monkeypatch.setenv(pass_api.PLUGINS_ENV, setting)
    with pytest.raises(fxforge.ConfigError, match="unknown pass 'fold-bm'"):
        pass_api.pass_class("fold-bm")  # a typo scans the plugins: only the allowed ones are imported
    assert {name for name in ("alpha", "beta") if f"fxforge_test_{name}" in sys.modules} == loaded
    assert {name for name in ("alpha", "beta") if f"test-plugin-{name}" in pass_api._REGISTRY} == loaded


@pytest.mark.parametrize("name", ["Fold_BN", "my pass", "a/b", "fold-bn{x=1}"])
def test_a_pass_name_that_is_not_kebab_case_is_refused_when_registered(name):
    with pytest.raises(fxforge.ConfigError, match="not kebab-case"):
        fxforge.graph_pass(name=name)(lambda gm, ctx: False)
    assert name not in pass_api._REGISTRY

"""Named pipeline fragments (fxforge.pipeline.fragments): registration, composition, variants by options."""

from __future__ import annotations

import pytest

import fxforge
import fxforge.api  # noqa: F401  (registers the built-in targets, parametrized over below)
from fxforge.pipeline import fragments
from fxforge.pipeline.targets import all_targets
from fxforge.pipeline.text import PassSpec, format_pipeline, parse_pipeline


@pytest.fixture
def registry(monkeypatch):
    """Fragments registered by a test are gone after it."""
    monkeypatch.setattr(fragments, "_FRAGMENTS", dict(fragments._FRAGMENTS))


def test_fragments_expand_where_named_and_nest(registry):
    fragments.register_fragment("test-prefix", "remove-noops,dce")
    specs = fragments.register_fragment("test-graph", "test-prefix", PassSpec("fold-bn"), "fuse-conv{post_ops=relu}")
    assert format_pipeline(list(specs)) == "remove-noops,dce,fold-bn,fuse-conv{post_ops=relu}"
    assert fragments.compose("test-graph", "to-nhwc,lower-cpu") == \
        "remove-noops,dce,fold-bn,fuse-conv{post_ops=relu},to-nhwc,lower-cpu"
    assert fragments.fragment("test-prefix") == (PassSpec("remove-noops"), PassSpec("dce"))


def test_a_fragment_cannot_take_a_pass_name_or_options(registry):
    with pytest.raises(fxforge.ConfigError, match="no pass has"):
        fragments.register_fragment("fold-bn", "dce")
    with pytest.raises(fxforge.ConfigError, match="no pass has"):
        fragments.register_fragment("test-x{a=1}", "dce")
    with pytest.raises(fxforge.ConfigError, match="kebab-case"):
        fragments.register_fragment("Test_X", "dce")


def test_an_unknown_fragment_names_the_registered_ones():
    with pytest.raises(fxforge.ConfigError, match="Did you mean 'canonicalize'"):
        fragments.fragment("canonicalise")


def test_with_options_sets_options_on_the_named_pass_only():
    text = "fuse-conv{post_ops=relu},to-nhwc,lower-cuda{dtype=bfloat16},cuda-runtime"
    assert fragments.with_options(text, "lower-cuda", fused=False, dtype="float32") == \
        "fuse-conv{post_ops=relu},to-nhwc,lower-cuda{dtype=float32,fused=false},cuda-runtime"
    assert fragments.with_options(text, "cuda-runtime", max_graphs=2).endswith(",cuda-runtime{max_graphs=2}")
    with pytest.raises(fxforge.ConfigError, match="no pass 'lower-cpu'"):
        fragments.with_options(text, "lower-cpu", autotune=True)
    variant = fragments.with_options(fxforge.pipeline_for("cpu"), "lower-cpu", autotune=True)
    assert fxforge.PassManager.from_text(variant).passes[-1].autotune is True


def test_without_drops_the_named_passes():
    assert fragments.without("remove-noops,attention-to-sdpa,fold-bn,attention-to-sdpa", "attention-to-sdpa") == \
        "remove-noops,fold-bn"


def _all_pipelines() -> dict[str, str]:
    out = {}
    for name, target in all_targets().items():
        out[name] = target.pipeline
        out.update({f"{name} {mode}": text for mode, text in target.mode_pipelines.items()})
    return out


@pytest.mark.parametrize(("name", "text"), _all_pipelines().items())
def test_every_target_pipeline_is_canonical_text_starting_with_canonicalize(name, text):
    specs = parse_pipeline(text)
    assert format_pipeline(specs) == text and parse_pipeline(format_pipeline(specs)) == specs
    prefix = fragments.fragment("canonicalize")
    assert tuple(specs[:len(prefix)]) == prefix  # the shared prefix, written once
    assert fxforge.PassManager.from_text(text).pipeline == text


def test_targets_that_share_graph_passes_share_a_fragment():
    assert fxforge.pipeline_for("cpu") == fragments.compose("cpu-graph", "lower-cpu")
    assert fxforge.pipeline_for("cpu-bf16") == fragments.compose("cpu-graph", "lower-cpu-bf16")
    for target in ("cuda", "cuda-bf16", "cuda-fp32"):
        specs = parse_pipeline(fxforge.pipeline_for(target))
        graph = fragments.fragment("cuda-graph")
        assert tuple(specs[:len(graph)]) == graph and [s.name for s in specs[len(graph):]] == [
            "lower-cuda", "cuda-runtime"]

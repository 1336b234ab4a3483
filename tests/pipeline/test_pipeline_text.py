import pytest

import fxforge
from fxforge.pipeline.pass_api import instantiate
from fxforge.pipeline.text import format_pipeline, parse_pipeline


@pytest.mark.parametrize("text", [
    "remove-noops,fold-bn,fuse-conv{post_ops=relu},lower-cpu",
    "fuse-conv{post_ops=add+relu},dce",
    "dce",
])
def test_pipeline_text_round_trips(text):
    assert format_pipeline(parse_pipeline(text)) == text


def test_every_target_pipeline_round_trips_through_pass_objects():
    for name in ("cpu",):
        text = fxforge.pipeline_for(name)
        assert fxforge.PassManager.from_text(text).pipeline == text


def test_options_are_typed_and_printed_back():
    p = instantiate(parse_pipeline("fuse-conv{post_ops=relu}")[0])
    assert p.post_ops == "relu"
    assert str(p.spec()) == "fuse-conv{post_ops=relu}"


@pytest.mark.parametrize("text, needle", [
    ("fold-bm", "Did you mean 'fold-bn'"),
    ("fuse-conv{post_op=relu}", "Did you mean 'post_ops'"),
    ("fuse-conv{post_ops=gelu}", "post_ops='gelu'"),
    ("fuse-conv{post_ops}", "write options as"),
    ("Fold_BN", "kebab-case"),
    ("fold-bn{", "unclosed"),
])
def test_bad_pipeline_text_is_a_config_error(text, needle):
    with pytest.raises(fxforge.ConfigError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        fxforge.PassManager.from_text(text)

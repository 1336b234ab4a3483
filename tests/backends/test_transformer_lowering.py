"""lower-cpu / lower-cpu-bf16 on transformer layers: Linear + GELU / residual add fused into one oneDNN matmul,
transformers' Conv1D lowered as a Linear, GPT-2's spelled-out GELU as one, plain many-row linears on prepacked
oneDNN; numerics against eager."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from fxforge.backends.cpu import LINEAR_MIN_ROWS, OneDnnLinear
from fxforge.backends.cpu_bf16 import EMULATE_ENV, OneDnnLinearBf16
from helpers import rel_error

T = pytest.importorskip("transformers")


class FeedForward(nn.Module):
    """A transformer block's MLP: up-projection, GELU, down-projection, residual add."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.up, self.down, self.approximate = nn.Linear(32, 64), nn.Linear(64, 32), approximate

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate=self.approximate)) + x


def _fused(compiled) -> dict[str, str]:
    """{module path: post-op} of the OneDnnLinear modules the compiled graph calls."""
    gm = compiled.graph_module
    return {str(n.target): ("add" if m.binary else m.activation or "none") for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(m := gm.get_submodule(str(n.target)), OneDnnLinear)}


@pytest.mark.parametrize("approximate, post_op", [("none", "gelu"), ("tanh", "gelu_tanh")])
def test_linear_gelu_and_linear_add_become_one_onednn_matmul_each(approximate, post_op):
    model, x = FeedForward(approximate).eval(), torch.randn(2, 16, 32)
    compiled = fxforge.compile(model, "cpu", example_inputs=(x,))
    assert _fused(compiled) == {"up": post_op, "down": "add"}
    assert not any(n.op == "call_function" and "gelu" in str(n.target) for n in compiled.graph_module.graph.nodes)
    assert rel_error(compiled(x), model(x)) <= 1e-4


def test_a_linear_whose_output_is_read_twice_keeps_its_gelu_apart():
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            y = self.fc(x)
            return F.gelu(y) + y

    model, x = Both().eval(), torch.randn(2, 16, 32)
    compiled = fxforge.compile(model, "cpu", example_inputs=(x,))
    assert _fused(compiled) == {"fc": "none"}  # lowered, nothing absorbed
    assert rel_error(compiled(x), model(x)) <= 1e-4


def test_a_broadcast_add_is_not_fused():
    class Bias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.shift = nn.Linear(32, 32), nn.Parameter(torch.randn(32))

        def forward(self, x):
            return self.fc(x) + self.shift

    model, x = Bias().eval(), torch.randn(2, 16, 32)
    compiled = fxforge.compile(model, "cpu", example_inputs=(x,))
    assert _fused(compiled) == {"fc": "none"}
    assert rel_error(compiled(x), model(x)) <= 1e-4


def test_plain_linears_go_to_onednn_only_from_the_row_threshold():
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    few, many = torch.randn(1, 32), torch.randn(LINEAR_MIN_ROWS, 32)
    assert _fused(fxforge.compile(model, "cpu", example_inputs=(few,))) == {}
    compiled = fxforge.compile(model, "cpu", example_inputs=(many,))
    assert _fused(compiled) == {"0": "none"}
    assert rel_error(compiled(many), model(many)) <= 1e-4


def _gpt2():
    config = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0,
                          eos_token_id=0)
    torch.manual_seed(0)
    return T.GPT2Model(config).eval(), {"input_ids": torch.randint(0, 1000, (2, 32)), "use_cache": False}


def _bert():
    config = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          vocab_size=1000)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 32))
    return T.BertModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_bert_layers_fuse_their_gelu_and_residual_adds():
    model, inputs = _bert()
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs)
    post_ops = list(_fused(compiled).values())
    # per layer: the intermediate dense with GELU, attention output and output dense with the residual add
    assert post_ops.count("gelu") == 2 and post_ops.count("add") == 4
    assert rel_error(compiled(**inputs).last_hidden_state, model(**inputs).last_hidden_state) <= 1e-4


def test_gpt2_conv1d_runs_as_a_onednn_linear_with_its_gelu():
    model, inputs = _gpt2()
    compiled = fxforge.compile(copy.deepcopy(model), "cpu", example_inputs=inputs)
    kinds = {type(m).__name__ for m in compiled.graph_module.modules()}
    assert "Conv1D" not in kinds
    post_ops = list(_fused(compiled).values())
    assert len(post_ops) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per layer
    assert post_ops.count("gelu_tanh") == 2  # mlp.c_fc takes the spelled-out tanh GELU (gelu_new)
    assert not any("tanh" in str(n.target) for n in compiled.graph_module.graph.nodes if n.op == "call_function")
    assert "Conv1D" in {type(m).__name__ for m in model.modules()}  # the user's model is untouched
    assert rel_error(compiled(**inputs).last_hidden_state, model(**inputs).last_hidden_state) <= 1e-4


def test_cpu_bf16_fuses_the_same_epilogues(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "1")
    model, inputs = _bert()
    compiled = fxforge.compile(model, "cpu-bf16", example_inputs=inputs)
    gm = compiled.graph_module
    post_ops = [("add" if m.binary else m.activation) for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(m := gm.get_submodule(str(n.target)), OneDnnLinearBf16)]
    assert post_ops.count("gelu") == 2 and post_ops.count("add") == 4
    actual, expected = compiled(**inputs).last_hidden_state, model(**inputs).last_hidden_state
    assert actual.dtype == torch.float32
    cosine = F.cosine_similarity(actual.flatten(), expected.flatten(), dim=0).item()
    assert not (cosine < 0.999)  # NaN fails too


def test_fused_linears_export_to_torchscript_with_their_post_ops():
    model, x = FeedForward("tanh").eval(), torch.randn(2, 16, 32)
    compiled = fxforge.compile(model, "cpu", example_inputs=(x,))
    scripted = compiled.to_torchscript(x)  # raises when the trace's outputs differ from the compiled model's
    assert rel_error(scripted(x), model(x)) <= 1e-4

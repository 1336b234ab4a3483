"""attention-to-sdpa: hand-written attention and self-attention MultiheadAttention onto sdpa."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from helpers import rel_error

PIPELINE = "remove-noops,attention-to-sdpa"


class HandWritten(nn.Module):
    """The textbook formula, in one of several spellings."""

    def __init__(self, spelling: str, heads: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.spelling, self.heads, self.dim = spelling, heads, dim
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        d = self.dim // self.heads
        if self.spelling == "div":
            probs = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
        elif self.spelling == "mul":
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5, -1)
        else:  # prescaled q, method softmax, mT
            probs = ((q * d ** -0.5) @ k.mT).softmax(dim=3)
        out = self.drop(probs) @ v
        return self.out(out.transpose(1, 2).reshape(b, n, self.dim))


def _sdpa_calls(gm) -> int:
    return sum(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)


@pytest.mark.parametrize("spelling", ["div", "mul", "prescaled"])
def test_hand_written_attention_becomes_one_sdpa_call_with_equal_outputs(spelling):
    torch.manual_seed(0)
    model, x = HandWritten(spelling).eval(), torch.randn(2, 5, 16)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, pipeline=PIPELINE)
    gm = compiled.graph_module
    assert _sdpa_calls(gm) == 1
    assert not [n for n in gm.graph.nodes if n.target in (F.softmax, torch.softmax, "softmax")]
    assert rel_error(compiled(x), model(x)) <= 1e-5


def test_softmax_over_another_dimension_is_not_attention():
    class NearMiss(nn.Module):
        def forward(self, q, k, v):
            return F.softmax(q @ k.transpose(-2, -1), dim=-2) @ v  # normalizes over queries, not keys

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    compiled = fxforge.compile(NearMiss().eval(), "cpu", example_inputs=(q, k, v), pipeline=PIPELINE)
    assert _sdpa_calls(compiled.graph_module) == 0
    assert torch.equal(compiled(q, k, v), NearMiss()(q, k, v))


def test_scores_read_elsewhere_are_left_alone():
    class ReturnsScores(nn.Module):
        def forward(self, q, k, v):
            scores = q @ k.transpose(-2, -1)
            return F.softmax(scores, dim=-1) @ v, scores

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    compiled = fxforge.compile(ReturnsScores().eval(), "cpu", example_inputs=(q, k, v), pipeline=PIPELINE)
    assert _sdpa_calls(compiled.graph_module) == 0


class Block(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.norm(x + y)


def test_self_attention_multihead_attention_runs_on_sdpa():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 7, 16)
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    assert "attention-to-sdpa" in compiled.pipeline
    assert not [m for m in compiled.graph_module.modules() if isinstance(m, nn.MultiheadAttention)]
    assert rel_error(compiled(x), model(x)) <= 1e-5
    assert isinstance(model.attn, nn.MultiheadAttention)  # the user's model is untouched


def test_sequence_first_multihead_attention_is_kept():
    model, x = Block(batch_first=False).eval(), torch.randn(7, 3, 16)
    compiled = fxforge.compile(model, "cpu", example_inputs=x, pipeline=PIPELINE)
    assert [m for m in compiled.graph_module.modules() if isinstance(m, nn.MultiheadAttention)]


@pytest.mark.slow
def test_vit_b_16_matches_eager_after_the_attention_rewrite():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.vit_b_16().eval(), torch.randn(1, 3, 224, 224)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes it: the output would be all 0
    compiled = fxforge.compile(model, "cpu", example_inputs=x)
    rewrites = [p for p in compiled.report.passes if p.name == "attention-to-sdpa"]
    assert rewrites and rewrites[0].modified
    assert not [m for m in compiled.graph_module.modules() if isinstance(m, nn.MultiheadAttention)]
    with torch.inference_mode():
        assert rel_error(compiled(x), model(x)) <= 1e-4

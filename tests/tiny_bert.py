"""A tiny Hugging Face BERT (random weights, no network) called with keyword inputs, for the tests of the
paths that take dict example inputs and return a ModelOutput."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def tiny_bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(BertModel with hidden size 32 and 2 layers in eval mode, {'input_ids', 'attention_mask'} of 2x8)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, 100, (2, 8), generator=generator),
              "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return model, inputs

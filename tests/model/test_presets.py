"""Presets have the published parameter counts (docs/model.md quotes them), counted on the meta device:
the modules the preset really builds, no memory spent, and `ModelConfig.num_parameters` agrees."""

import pytest
import torch

import lmstack

# Published totals (tied embeddings counted once): GPT-2 124M, Llama 3.2 1B, Qwen3 0.6B, Mixtral 8x7B.
PUBLISHED = {"gpt2": 124_439_808, "llama-3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920,
             "mixtral-8x7b": 46_702_792_704}
# As docs/model.md rounds them.
DOCS = {"gpt2": (124.4e6, 0.05e6), "llama-3.2-1b": (1.236e9, 0.0005e9), "qwen3-0.6b": (596e6, 0.5e6),
        "mixtral-8x7b": (46.7e9, 0.05e9)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts_are_the_published_ones(name):
    config = lmstack.get_preset(name)
    with torch.device("meta"):
        model = lmstack.Transformer(config)
    built = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    assert built == config.num_parameters() == PUBLISHED[name]
    value, tolerance = DOCS[name]
    assert abs(built - value) <= tolerance

"""Shared pieces of the engine tests: tiny random models, the single-prompt reference, a fake runner."""

from __future__ import annotations

import functools

import torch
from hf_models import randomize_

import lmstack
from lmstack.config import get_preset
from lmstack.infer import GenerationConfig
from lmstack.infer import generate as infer_generate


@functools.cache
def tiny_model(family: str, **changes):
    config = get_preset(f"tiny-{family}").replace(**changes)
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, seed=0, config=config)
    return randomize_(model, seed=1, std=0.15).eval()


def prompts(lengths, seed=0, vocab=256):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def alone(model, prompt, max_tokens, tokenizer=None, **options):
    """`infer.generate` on one prompt: the reference every batched result must equal."""
    config = GenerationConfig(max_new_tokens=max_tokens, **{"ignore_eos": True, **options})
    return infer_generate(model, [prompt], config, tokenizer)[0]


class FakeRunner:
    """Random logits instead of a forward: for tests of scheduling and block accounting only."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = []

    def run(self, scheduled, keep_rows, fed=None):
        self.calls.append([(s.seq, s.start, s.num_tokens) for s in scheduled])
        return torch.randn(len(keep_rows), self.vocab_size, generator=self.gen)

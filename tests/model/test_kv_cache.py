"""Incremental decoding through the KV cache equals a full forward (fp32, <= 1e-5); every test draws its
ids from its own generator, so what ran before does not change them."""

import pytest
import torch
from hf_models import randomize_

import lmstack
from lmstack.model import KVCache

FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral"]


def _model(family):
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, seed=0)
    return randomize_(model, seed=1, std=0.15).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_token_by_token_equals_full_forward(family):
    model = _model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, batch_size=2, max_length=32)
        steps = [model(ids[:, :9], kv_cache=cache).logits]  # prefill, longer than mistral's window (8)
        for t in range(9, 24):
            steps.append(model(ids[:, t : t + 1], kv_cache=cache).logits)
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


def test_chunked_prefill_with_sliding_window():
    model = _model("mistral")
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, batch_size=1, max_length=30)
        chunks = [model(ids[:, a:b], kv_cache=cache).logits for a, b in [(0, 7), (7, 19), (19, 30)]]
    assert (torch.cat(chunks, 1) - full).abs().max().item() <= 1e-5


def test_left_padded_batch_matches_each_row_alone():
    model = _model("llama")
    a = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    b = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=2, max_length=16)
        batched = [model(ids, attention_mask=mask, kv_cache=cache).logits[:, -1]]
        nxt = torch.randint(3, 256, (2, 1), generator=torch.Generator().manual_seed(5))
        batched.append(model(nxt, kv_cache=cache).logits[:, -1])
        for row, prompt in enumerate([a, b]):
            alone = model(torch.cat([prompt, nxt[row : row + 1]], 1)).logits
            assert (batched[0][row] - alone[0, -2]).abs().max() <= 1e-5
            assert (batched[1][row] - alone[0, -1]).abs().max() <= 1e-5


def test_crop_rolls_back_rejected_tokens():
    model = _model("qwen3")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=1, max_length=20)
        model(ids[:, :8], kv_cache=cache)
        rejected = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(7))
        model(rejected, kv_cache=cache)  # speculative tokens, then rejected
        cache.crop(8)
        out = model(ids[:, 8:], kv_cache=cache).logits
        full = model(ids).logits
    assert (out - full[:, 8:]).abs().max() <= 1e-5


def test_cache_overflow_is_a_clear_error():
    model = _model("llama")
    cache = KVCache(model.config, batch_size=1, max_length=4)
    with pytest.raises(lmstack.LmstackError, match="KV cache is full.*max_length=4"):
        model(torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(8)), kv_cache=cache)

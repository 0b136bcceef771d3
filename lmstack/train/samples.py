"""Sample generations during training: a fixed prompt, a private RNG, the model's KV cache.

TEMPORARY: a minimal temperature/top-k loop until `lmstack.infer.generate` lands on main; it
will then be replaced by a call to it. It draws from its own seeded `torch.Generator`, so
printing samples never changes the training run's random stream (exact resume relies on it).
"""

from __future__ import annotations

import torch

from lmstack.model.cache import KVCache


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                seed: int = 0) -> str:
    """The prompt followed by up to `max_new_tokens` sampled tokens, decoded."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    if not ids:
        return prompt
    max_len = min(model.config.max_position_embeddings, len(ids) + max_new_tokens)
    if len(ids) >= max_len:
        return prompt
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.config, 1, max_len, device=device, dtype=next(model.parameters()).dtype)
    x = torch.tensor([ids], device=device)
    out = list(ids)
    eos = tokenizer.eos_token_id
    try:
        while len(out) < max_len:
            logits = model(x, kv_cache=cache, logits_to_keep=1).logits[:, -1].float()
            if temperature <= 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out.append(int(token))
            if eos is not None and out[-1] == eos:
                break
            x = token
    finally:
        model.train(was_training)
    return tokenizer.decode(out)

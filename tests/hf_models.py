"""Tiny random transformers models of every supported family, the reference for parity tests."""

from __future__ import annotations

import torch

VOCAB = 97

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def hf_config(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "gpt2":
        kw = dict(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        kw.update(overrides)
        return tf.GPT2Config(**kw)
    if family == "llama":
        kw = dict(common, rope_scaling=dict(LLAMA3_SCALING), rope_theta=500000.0, tie_word_embeddings=False)
        kw.update(overrides)
        return tf.LlamaConfig(**kw)
    if family == "qwen2":
        kw = dict(common, tie_word_embeddings=True)
        kw.update(overrides)
        return tf.Qwen2Config(**kw)
    if family == "qwen3":
        kw = dict(common, head_dim=16, tie_word_embeddings=False)
        kw.update(overrides)
        return tf.Qwen3Config(**kw)
    if family == "mistral":
        kw = dict(common, sliding_window=5)
        kw.update(overrides)
        return tf.MistralConfig(**kw)
    if family == "mixtral":
        kw = dict(common, num_local_experts=4, num_experts_per_tok=2)
        kw.update(overrides)
        return tf.MixtralConfig(**kw)
    raise ValueError(family)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so a mis-mapped tensor changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if "norm" in name or "ln_" in name:
                noise = noise * 0.3 + (1.0 if name.endswith("weight") else 0.0)
            p.copy_(noise.to(p.dtype))
    return model


def hf_model(family: str, seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    cls = tf.GPT2LMHeadModel if family == "gpt2" else tf.AutoModelForCausalLM.from_config
    model = cls(config) if family == "gpt2" else cls(config, attn_implementation="eager")
    if family == "gpt2":
        model.config._attn_implementation = "eager"
    randomize_(model, seed)
    return model.eval()


FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral"]


def token_ids(shape, high: int = VOCAB, seed: int = 0, low: int = 0) -> torch.Tensor:
    """Random token ids from their own generator: the same ids whatever ran before (test order)."""
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))

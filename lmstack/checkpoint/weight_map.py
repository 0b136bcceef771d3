"""Weight-name maps: how each of our parameters is stored in each Hugging Face architecture.

One `Rule` per parameter of ours: the HF tensor(s) it comes from and how they combine
(`copy`, `transpose` for GPT-2's Conv1D, `cat` along rows for our fused qkv / gate_up
matrices, split back by `sizes` on save). The same table drives loading and saving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmstack.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"  # "copy" | "transpose" | "cat"
    sizes: tuple[int, ...] = ()  # row sizes of each part, for "cat"

    def combine(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.op == "transpose":
            return tensors[0].t()
        if self.op == "cat":
            return torch.cat(tensors, dim=0)
        return tensors[0]

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.op == "transpose":
            return [tensor.t()]
        if self.op == "cat":
            return list(tensor.split(list(self.sizes), dim=0))
        return [tensor]


# Tensors some checkpoints carry that are not weights (causal-mask buffers, rotary caches).
IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    p = "transformer."
    rules = [Rule("embed.weight", (p + "wte.weight",)), Rule("pos_embed.weight", (p + "wpe.weight",))]
    for i in range(cfg.num_layers):
        h, o = f"{p}h.{i}.", f"layers.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            rules += [Rule(f"{o}{ours}.weight", (f"{h}{theirs}.weight",)),
                      Rule(f"{o}{ours}.bias", (f"{h}{theirs}.bias",))]
        for ours, theirs, has_bias in _gpt2_linears(cfg):
            rules.append(Rule(f"{o}{ours}.weight", (f"{h}{theirs}.weight",), "transpose"))
            if has_bias:
                rules.append(Rule(f"{o}{ours}.bias", (f"{h}{theirs}.bias",)))
    rules += [Rule("norm.weight", (p + "ln_f.weight",)), Rule("norm.bias", (p + "ln_f.bias",))]
    return rules


def _gpt2_linears(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(ours, theirs, whether our model has its bias) for each linear of a GPT-2 block."""
    return [("attn.qkv", "attn.c_attn", cfg.attn_qkv_bias), ("attn.out", "attn.c_proj", cfg.attn_out_bias),
            ("mlp.up", "mlp.c_fc", cfg.mlp_bias), ("mlp.down", "mlp.c_proj", cfg.mlp_bias)]


def bias_stored_as_zeros(cfg: ModelConfig, field: str) -> bool:
    """Whether the bias switch `field` is off in a family whose layout stores that bias anyway
    (as zeros, see implied_zeros): then config.json says it is on, and both mean the same model."""
    return cfg.family == "gpt2" and field in ("attn_qkv_bias", "attn_out_bias", "mlp_bias") and not getattr(cfg, field)


def implied_zeros(cfg: ModelConfig) -> dict[str, str]:
    """HF tensors the layout always holds but this model has no parameter for -> our weight they belong to.

    GPT-2's layout has no switch for linear biases: a GPT-2-family model built without them (as
    nanoGPT's bias=False) is saved with zero biases, which is the same function, and a checkpoint
    loaded into such a model must have zero biases there (anything else would be dropped)."""
    if cfg.family != "gpt2":
        return {}
    return {f"transformer.h.{i}.{theirs}.bias": f"layers.{i}.{ours}.weight"
            for i in range(cfg.num_layers) for ours, theirs, has_bias in _gpt2_linears(cfg) if not has_bias}


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("embed.weight", ("model.embed_tokens.weight",))]
    qkv_sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
    for i in range(cfg.num_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        a = h + "self_attn."
        rules += [Rule(o + "attn_norm.weight", (h + "input_layernorm.weight",)),
                  Rule(o + "mlp_norm.weight", (h + "post_attention_layernorm.weight",)),
                  Rule(o + "attn.qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                       "cat", qkv_sizes),
                  Rule(o + "attn.out.weight", (a + "o_proj.weight",))]
        if cfg.attn_qkv_bias:
            rules.append(Rule(o + "attn.qkv.bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                              "cat", qkv_sizes))
        if cfg.attn_out_bias:
            rules.append(Rule(o + "attn.out.bias", (a + "o_proj.bias",)))
        if cfg.qk_norm:
            rules += [Rule(o + "attn.q_norm.weight", (a + "q_norm.weight",)),
                      Rule(o + "attn.k_norm.weight", (a + "k_norm.weight",))]
        if cfg.mlp == "moe":
            m = h + "block_sparse_moe."
            rules.append(Rule(o + "mlp.router.weight", (m + "gate.weight",)))
            for e in range(cfg.num_experts):
                x = f"{m}experts.{e}."
                rules += [Rule(f"{o}mlp.experts.{e}.gate_up.weight", (x + "w1.weight", x + "w3.weight"), "cat",
                               (cfg.intermediate_size, cfg.intermediate_size)),
                          Rule(f"{o}mlp.experts.{e}.down.weight", (x + "w2.weight",))]
        else:
            m = h + "mlp."
            rules += [Rule(o + "mlp.gate_up.weight", (m + "gate_proj.weight", m + "up_proj.weight"), "cat",
                           (cfg.intermediate_size, cfg.intermediate_size)),
                      Rule(o + "mlp.down.weight", (m + "down_proj.weight",))]
            if cfg.mlp_bias:
                rules += [Rule(o + "mlp.gate_up.bias", (m + "gate_proj.bias", m + "up_proj.bias"), "cat",
                               (cfg.intermediate_size, cfg.intermediate_size)),
                          Rule(o + "mlp.down.bias", (m + "down_proj.bias",))]
    rules.append(Rule("norm.weight", ("model.norm.weight",)))
    return rules


def weight_rules(cfg: ModelConfig) -> list[Rule]:
    """Every parameter of a `Transformer(cfg)` and where it lives in the HF checkpoint."""
    rules = _gpt2_rules(cfg) if cfg.family == "gpt2" else _llama_rules(cfg)
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def strip_prefix_aliases(names: set[str], rules: list[Rule]) -> dict[str, str]:
    """Map expected HF names to the names present, for checkpoints saved without the base prefix.

    The original GPT-2 files store `h.0.attn.c_attn.weight` where GPT2LMHeadModel has
    `transformer.h.0...`; we accept both spellings.
    """
    aliases: dict[str, str] = {}
    for rule in rules:
        for name in rule.theirs:
            if name in names:
                aliases[name] = name
            else:
                for prefix in ("transformer.", "model."):
                    if name.startswith(prefix) and name[len(prefix):] in names:
                        aliases[name] = name[len(prefix):]
    return aliases

"""The one decoder-only Transformer behind every family lmstack supports.

`ModelConfig` switches norm, positions, attention and MLP; there is no class per family.
`forward` returns logits (and the loss when labels are given); an attention context or KV
cache passed as `kv_cache` turns the same forward into incremental decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.errors import ConfigError
from lmstack.model.attention import Attention, AttentionContext, CausalContext
from lmstack.model.mlp import GeluMLP, SwiGLU
from lmstack.model.moe import MoE, load_balancing_loss
from lmstack.model.norms import make_norm
from lmstack.model.rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # None when the loss was computed in chunks (loss_chunk_tokens)
    loss: torch.Tensor | None = None  # the training objective: ce_loss (+ coef * aux_loss for MoE)
    ce_loss: torch.Tensor | None = None  # mean cross-entropy over unmasked label positions
    aux_loss: torch.Tensor | None = None  # MoE load-balancing term (computed when labels are given)
    hidden_states: torch.Tensor | None = None  # final normed hidden states, on request


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.hidden_size)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config, config.hidden_size)
        if config.mlp == "moe":
            self.mlp = MoE(config)
        elif config.mlp == "swiglu":
            self.mlp = SwiGLU(config)
        else:
            self.mlp = GeluMLP(config)
        self.dropout = config.dropout

    def resid_drop(self, x: torch.Tensor) -> torch.Tensor:
        # a plain function, not an nn.Dropout module: decoding calls this 2x per layer per token
        return F.dropout(x, self.dropout, training=True) if self.dropout > 0 and self.training else x

    def forward(self, x, rope, context) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.resid_drop(self.attn(self.attn_norm(x), rope, context))
        h = self.mlp(self.mlp_norm(x))
        router_logits = None
        if isinstance(h, tuple):
            h, router_logits = h
        return x + self.resid_drop(h), router_logits


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.embed = nn.Embedding(vocab, config.hidden_size)
        self.pos_embed = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if config.position == "learned" else None
        )
        self.rope = RotaryEmbedding(config) if config.position == "rope" else None
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False
        self.loss_chunk_tokens = 0  # > 0: the loss (given labels) is computed in chunks, without logits
        if not self.embed.weight.is_meta:
            self.apply(self._init_weights)
            self._init_residual_projections()

    # ---- initialisation --------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def _init_residual_projections(self) -> None:
        """GPT-2's rule: projections into the residual stream get std / sqrt(2 * layers)."""
        std = self.config.initializer_range / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=std)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers after `to_empty()`/meta construction."""
        if self.rope is not None:
            self.rope.reset_parameters()

    # ---- forward ---------------------------------------------------------------------------
    def default_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          kv_cache) -> torch.Tensor:
        B, T = input_ids.shape
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if kv_cache is not None and hasattr(kv_cache, "next_positions"):
            positions = positions + kv_cache.next_positions()[:, None]
        return positions

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: AttentionContext | None = None,
        shift_labels: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, vocab).

        labels: (B, T) token ids with -100 where no loss is wanted. As in transformers they are
        aligned with input_ids and shifted here; pass `shift_labels=False` for targets that are
        already shifted (the pretraining loader gives x and y = x shifted by one).
        positions: (B, T) RoPE/learned positions; by default counted from the attention mask
        (left padding) and the cache. logits_to_keep: only the last n positions' logits, or (as
        in transformers) a 1-D tensor of the positions to keep (the engine keeps one row per sequence).
        """
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ConfigError(f"input_ids must be integer token ids shaped (batch, tokens), got a {input_ids.dtype} "
                              f"tensor of shape {tuple(input_ids.shape)}" +
                              ("; add the batch dimension: input_ids[None]" if input_ids.dim() == 1 else ""))
        if labels is not None and labels.shape != input_ids.shape:
            raise ConfigError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                              f"{tuple(input_ids.shape)} (aligned with them; -100 where no loss is wanted)")
        B, T = input_ids.shape
        if positions is None:
            positions = self.default_positions(input_ids, attention_mask, kv_cache)
        elif positions.dim() == 1:
            positions = positions.expand(B, T)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        if kv_cache is None:
            context = CausalContext(positions, attention_mask, document_ids)
        else:
            context = kv_cache
            if hasattr(kv_cache, "prepare"):
                kv_cache.prepare(positions, attention_mask)
        router_logits = []
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x, r = torch.utils.checkpoint.checkpoint(block, x, rope, context, use_reentrant=False)
            else:
                x, r = block(x, rope, context)
            if r is not None:
                router_logits.append(r)
        x = self.norm(x)
        hidden = x if output_hidden_states else None
        if labels is not None and attention_mask is not None and attention_mask.dim() == 2:
            labels = ignore_labels_seen_from_padding(labels, attention_mask, shift_labels)
        if labels is not None and self.loss_chunk_tokens:
            out = CausalLMOutput(logits=None, hidden_states=hidden)  # no (tokens x vocab) logits at all
            out.ce_loss = self._chunked_loss(x, labels, shift_labels)
            return self._add_aux_loss(out, router_logits, attention_mask)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        out = CausalLMOutput(logits=logits, hidden_states=hidden)
        if labels is None:
            return out
        out.ce_loss = cross_entropy(logits, labels, shift_labels)
        return self._add_aux_loss(out, router_logits, attention_mask)

    def _add_aux_loss(self, out: CausalLMOutput, router_logits: list, attention_mask) -> CausalLMOutput:
        """loss = ce_loss (+ the MoE load-balancing term; computed with labels only: decoding would
        pay for it every token)."""
        out.loss = out.ce_loss
        if router_logits:
            token_mask = attention_mask.reshape(-1) if attention_mask is not None else None
            out.aux_loss = load_balancing_loss(router_logits, self.config.num_experts,
                                               self.config.num_experts_per_tok, token_mask)
            out.loss = out.ce_loss + self.config.router_aux_loss_coef * out.aux_loss
        return out

    def _chunked_loss(self, x: torch.Tensor, labels: torch.Tensor, shift_labels: bool) -> torch.Tensor:
        from lmstack.model.chunked_loss import chunked_cross_entropy

        if shift_labels:
            x, labels = x[:, :-1], labels[:, 1:]
        if x.shape[:2] != labels.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the hidden states {tuple(x.shape[:2])}")
        weight = self.lm_head.weight[: self.config.vocab_size]  # padded vocabulary rows never score
        return chunked_cross_entropy(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1), self.loss_chunk_tokens)

    # ---- conveniences ------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and name.startswith(("embed.", "pos_embed."))):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward); see ModelConfig.flops_per_token."""
        return self.config.flops_per_token(seq_len)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def save_pretrained(self, directory: str | Path, tokenizer=None, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | str | None = None, generation_defaults: dict | None = None) -> Path:
        """Write a Hugging Face directory (config.json, safetensors, generation_config.json)."""
        from lmstack.checkpoint.hf import save_hf

        return save_hf(self, directory, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype,
                       generation_defaults=generation_defaults)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> Transformer:
        from lmstack.checkpoint.hf import load_hf_model

        return load_hf_model(directory, dtype=dtype, device=device)


def ignore_labels_seen_from_padding(labels: torch.Tensor, attention_mask: torch.Tensor,
                                    shift_labels: bool) -> torch.Tensor:
    """-100 for every label predicted at a padding position: a pad query attends to nothing real,
    so its prediction (e.g. of a left-padded row's first token) carries no signal; transformers
    would average garbage there, and the usual `labels[mask == 0] = -100` misses that label."""
    padding = attention_mask == 0
    if shift_labels:
        padding = torch.cat([padding.new_zeros(padding.shape[0], 1), padding[:, :-1]], dim=1)
    return labels.masked_fill(padding, IGNORE_INDEX)  # no `padding.any()`: that would sync with the GPU


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool = True) -> torch.Tensor:
    """Mean token cross-entropy over labels != -100 (0 when every label is masked, never NaN)."""
    if shift_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.shape[:2] != labels.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape[:2])}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32; float64 stays
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count

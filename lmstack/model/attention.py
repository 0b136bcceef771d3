"""Multi-head attention (MHA/GQA/MQA, QKV bias, QK-norm, sliding window) and its context.

`Attention` computes q, k, v and hands them to an *attention context* that owns the masking
and, where there is one, the KV cache. The context is made once per forward and shared by
every layer, so masks are built once; swapping the context is how the contiguous cache here,
the static cache of `infer/` and the paged cache of `engine/` plug into the same model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.model.norms import RMSNorm
from lmstack.model.rope import apply_rope_qk


class AttentionContext(Protocol):
    """What every layer's attention calls: write k/v where needed and return the attention output."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None, dropout_p: float) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with grouped-query heads: (B, H, T, D) x (B, Hkv, S, D) -> (B, H, T, D)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=k.shape[1] != q.shape[1]
    )


def build_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, q_positions: torch.Tensor,
               k_positions: torch.Tensor, window: int | None, k_valid: torch.Tensor | None = None,
               q_docs: torch.Tensor | None = None, k_docs: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): causal by slot order, within the window by position, valid keys only.

    A query that may see nothing (a padding row) is allowed its own slot, so SDPA never
    produces NaN; its output is ignored by the caller anyway.
    """
    allowed = k_slots[None, None, :] <= q_slots[None, :, None]  # (1, T, S)
    if window is not None:
        allowed = allowed & ((q_positions[:, :, None] - k_positions[:, None, :]) < window)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    if q_docs is not None:
        allowed = allowed & (q_docs[:, :, None] == k_docs[:, None, :])
    allowed = allowed | (k_slots[None, None, :] == q_slots[None, :, None])
    return allowed[:, None]


class CausalContext:
    """No cache: plain causal self-attention over the tokens of this forward.

    `attention_mask` (B, T) marks real tokens (left or right padding); `document_ids` (B, T)
    keeps packed examples from attending to each other. With neither and no sliding window,
    SDPA's `is_causal` path is used so GPUs get the flash kernel.
    """

    def __init__(self, positions: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 document_ids: torch.Tensor | None = None):
        self.positions = positions
        self.attention_mask = attention_mask.bool() if attention_mask is not None else None
        self.document_ids = document_ids
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor | None:
        if window is None and self.attention_mask is None and self.document_ids is None:
            return None
        if window not in self._masks:
            slots = torch.arange(self.positions.shape[1], device=self.positions.device)
            self._masks[window] = build_mask(slots, slots, self.positions, self.positions, window,
                                             self.attention_mask, self.document_ids, self.document_ids)
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None, dropout_p: float) -> torch.Tensor:
        mask = self.mask(window)
        return sdpa(q, k, v, mask=mask, is_causal=mask is None, dropout_p=dropout_p)


class Attention(nn.Module):
    """Fused QKV projection, optional per-head QK RMSNorm, RoPE, then the context's attention."""

    rope_fn = staticmethod(apply_rope_qk)  # `model/fusion.py` may set a compiled one on an instance

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.window = config.window_for_layer(layer)
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attn_qkv_bias)
        self.out = nn.Linear(self.q_size, config.hidden_size, bias=config.attn_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                context: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = self.rope_fn(q, k, *rope)
        y = context.attend(self.layer, q, k, v, self.window, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_size))

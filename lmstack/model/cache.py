"""A contiguous, preallocated KV cache for incremental decoding of a batch of sequences.

Buffers are (layers, batch, kv_heads, max_length, head_dim) and never grow. Each forward
appends its tokens at the next slots; a slot's RoPE position is stored beside it (-1 marks a
padding slot) so left-padded batches, sliding windows and rollback (speculative decoding)
are all masks over the same buffer. The paged cache of the serving engine lives in `engine/`.
"""

from __future__ import annotations

import torch

from lmstack.config import ModelConfig
from lmstack.errors import ConfigError
from lmstack.model.attention import build_mask, sdpa


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_positions = torch.full((batch_size, max_length), -1, device=device, dtype=torch.long)
        self.max_length = max_length
        self.length = 0  # slots used so far (same for every row; padding slots have position -1)
        self._start = 0
        self._q_positions: torch.Tensor | None = None
        self._padded = False  # once a padded batch was seen, every step builds an explicit mask
        self._masks: dict[int | None, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def next_positions(self) -> torch.Tensor:
        """(B,) the RoPE position the next real token of each row gets."""
        return self.key_positions.max(dim=1).values + 1

    def prepare(self, positions: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Called by the model once per forward: reserve slots for T new tokens of each row."""
        T = positions.shape[1]
        if self.length + T > self.max_length:
            raise ConfigError(
                f"KV cache is full: {self.length} tokens cached + {T} new > max_length={self.max_length}; "
                "allocate a larger cache (max_length) or generate fewer tokens"
            )
        self._start, self.length = self.length, self.length + T
        stored = positions if attention_mask is None else positions.masked_fill(~attention_mask.bool(), -1)
        self.key_positions[:, self._start:self.length] = stored
        self._q_positions = positions
        self._padded = self._padded or attention_mask is not None
        self._masks = {}

    def _mask(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for this forward; the mask-free cases keep SDPA on its fastest path."""
        if window is None and not self._padded:
            if self._start == 0:
                return None, True  # a plain causal prefill
            if self.length - self._start == 1:
                return None, False  # one new token sees every cached one
        if window not in self._masks:
            device = self.key_positions.device
            q_slots = torch.arange(self._start, self.length, device=device)
            k_slots = torch.arange(self.length, device=device)
            k_positions = self.key_positions[:, : self.length]
            self._masks[window] = build_mask(q_slots, k_slots, self._q_positions, k_positions, window,
                                             k_valid=k_positions >= 0)
        return self._masks[window], False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None, dropout_p: float) -> torch.Tensor:
        self.k[layer, :, :, self._start:self.length] = k
        self.v[layer, :, :, self._start:self.length] = v
        keys, values = self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]
        mask, is_causal = self._mask(window)
        return sdpa(q, keys, values, mask=mask, is_causal=is_causal)

    def crop(self, length: int) -> None:
        """Forget every slot from `length` on (rejected speculative tokens, a retried step)."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot crop the KV cache to {length}: it holds {self.length} slots")
        self.key_positions[:, length:] = -1
        self.length = length

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep/duplicate batch rows (beam search): row i becomes old row rows[i]."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.key_positions = self.key_positions.index_select(0, rows)

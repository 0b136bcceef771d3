"""A static KV cache whose every step has the same shapes, so it can be captured in a CUDA graph.

Unlike `model.cache.KVCache` (which slices the buffer to the slots used so far), here the
write position is a device tensor (`cursor`) and attention always spans the whole buffer
with a mask: a decode step has identical shapes and addresses every time, as gpt-fast's.
Slots never written, padding and rolled-back slots carry position -1 and are masked out.
"""

from __future__ import annotations

import torch

from lmstack.config import ModelConfig
from lmstack.model.attention import build_mask, sdpa


class StaticContext:
    """The attention context of one forward over a `StaticKVCache` (made inside compiled code)."""

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor, masks: dict[int | None, torch.Tensor]):
        self.cache, self.slots, self.masks = cache, slots, masks

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None, dropout_p: float) -> torch.Tensor:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(2, self.slots, k.to(keys.dtype))
        values.index_copy_(2, self.slots, v.to(values.dtype))
        return sdpa(q, keys, values, mask=self.masks[window])


class StaticKVCache:
    """Per-layer buffers (B, kv_heads, max_length, head_dim) at fixed addresses.

    Usable as a drop-in `kv_cache=` for the model (eager), or through `context()` inside a
    compiled step. Writing past max_length is not checked on the device (that would need a
    host sync); `infer.generate` sizes the cache for the whole request before it starts.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.key_positions = torch.full((batch_size, max_length), -1, device=device, dtype=torch.long)
        self.cursor = torch.zeros((), device=device, dtype=torch.long)  # next free slot
        # next RoPE/learned position per row, kept up to date instead of reduced over the whole
        # buffer every step (a max over key_positions fused into the embedding lookup crashed
        # inductor's CUDA-graph decode for learned positions)
        self.next_pos = torch.zeros((batch_size,), device=device, dtype=torch.long)
        self.slot_ids = torch.arange(max_length, device=device)
        self.windows = sorted({config.window_for_layer(i) for i in range(config.num_layers)},
                              key=lambda w: -1 if w is None else w)
        self.max_length = max_length
        for t in [*self.k, *self.v, self.key_positions, self.cursor, self.next_pos, self.slot_ids]:
            torch._dynamo.mark_static_address(t)  # CUDA graphs may keep pointing at these
        self._context: StaticContext | None = None

    @property
    def batch_size(self) -> int:
        return self.key_positions.shape[0]

    def next_positions(self) -> torch.Tensor:
        """(B,) the RoPE position the next real token of each row gets."""
        return self.next_pos.clone()

    def context(self, positions: torch.Tensor, attention_mask: torch.Tensor | None = None) -> StaticContext:
        """Reserve slots [cursor, cursor + T) for this forward and build its masks (tensor ops only)."""
        T = positions.shape[1]
        slots = self.cursor + torch.arange(T, device=positions.device)
        stored = positions if attention_mask is None else positions.masked_fill(~attention_mask.bool(), -1)
        self.key_positions.index_copy_(1, slots, stored)
        self.next_pos.copy_(torch.maximum(self.next_pos, stored.max(dim=1).values + 1))
        self.cursor.add_(T)
        valid = self.key_positions >= 0
        masks = {w: build_mask(slots, self.slot_ids, positions, self.key_positions, w, k_valid=valid)
                 for w in self.windows}
        return StaticContext(self, slots, masks)

    # the eager drop-in protocol of model.cache.KVCache
    def prepare(self, positions: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        self._context = self.context(positions, attention_mask)

    def attend(self, layer, q, k, v, window, dropout_p):
        return self._context.attend(layer, q, k, v, window, dropout_p)

    # ---- host-side bookkeeping (between steps, never inside a graph) ----------------------------
    def reset(self) -> None:
        self.key_positions.fill_(-1)
        self.cursor.zero_()
        self.next_pos.zero_()

    def crop(self, length: int) -> None:
        """Forget every slot from `length` on (rejected speculative tokens, padded prefill tail)."""
        self.key_positions[:, length:] = -1
        self.cursor.fill_(length)
        self.next_pos.copy_(self.key_positions.max(dim=1).values + 1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row rows[i] (beam search), in place so addresses stay fixed."""
        for buffers in (self.k, self.v):
            for t in buffers:
                t.copy_(t.index_select(0, rows))
        self.key_positions.copy_(self.key_positions.index_select(0, rows))
        self.next_pos.copy_(self.next_pos.index_select(0, rows))

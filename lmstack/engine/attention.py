"""Attention over the paged KV cache: the context the model calls, and the reference path.

The runner runs the model on one flat batch of every scheduled token (input_ids (1, N)).
Each layer's attention hands q, k, v to `PagedAttentionContext.attend`, which writes the new
keys and values into their cache slots and attends each sequence's queries to its own blocks.
`reference_attention` gathers blocks and calls SDPA: plain PyTorch, runs on every device, and
is what the fast Triton path (`triton_attention.py`) is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmstack.model.attention import sdpa


@dataclass
class AttentionMetadata:
    """Where every scheduled token goes and what each sequence may see, for one forward.

    Sequences are ordered decodes first: the first `num_decodes` have exactly one query token.
    Device tensors are int32 except `slot_mapping` (int64, an index for `index_copy_`).
    """

    slot_mapping: torch.Tensor  # (N,) cache slot of each new token
    query_start: torch.Tensor  # (S + 1,) offsets of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor  # (S,) tokens in the cache after this step (context + new)
    block_tables: torch.Tensor  # (S, max_blocks)
    num_decodes: int
    query_start_host: list[int]
    seq_lens_host: list[int]
    qblock_seq: torch.Tensor | None = None  # (programs,) Triton: the sequence of each query block
    qblock_start: torch.Tensor | None = None  # (programs,) Triton: its first token
    block_q: int = 1  # Triton: query tokens per program

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, "int | None"], torch.Tensor]


class PagedAttentionContext:
    """The attention context (see `lmstack.model.attention`) of one engine forward."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 attention: AttentionFn):
        self.k_cache, self.v_cache = k_cache, v_cache  # (layers, blocks, block_size, kv_heads, head_dim)
        self.meta = meta
        self.attention = attention

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None, dropout_p: float) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) -> (1, H, N, D)."""
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        write_kv(k_cache, v_cache, k, v, self.meta.slot_mapping)
        return self.attention(q, k_cache, v_cache, self.meta, window)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys/values as the cache stores them. An fp8 cache keeps them unscaled (vLLM's default
    scale of 1.0 without calibration) and clamps to the format's range: a float8_e4m3fn cast
    of a larger value would give NaN, a clamp only loses what the format cannot hold."""
    if x.dtype == dtype:
        return x
    if dtype.itemsize == 1:
        bound = torch.finfo(dtype).max
        x = x.clamp(-bound, bound)
    return x.to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values at their slots (one index_copy_ each, graph-safe)."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    for cache, new in ((k_cache, k), (v_cache, v)):
        rows = to_cache_dtype(new[0], cache.dtype).transpose(0, 1)
        if cache.dtype.itemsize == 1:  # torch has no index_copy_ for fp8: copy the bytes
            cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
        cache.view(num_slots, *cache.shape[2:]).index_copy_(0, slot_mapping, rows)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` keys (or values) of one sequence as (Hkv, length, D)."""
    blocks = block_table[: -(-length // cache.shape[1])].long()
    return cache[blocks].flatten(0, 1)[:length].transpose(0, 1)


def _as(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == q.dtype else x.to(q.dtype)  # an fp8 cache is read in the query's dtype


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, window: int | None) -> torch.Tensor:
    """Gather each sequence's blocks and run SDPA: decodes as one padded batch, prompts one by one."""
    out = torch.empty_like(q)
    nd, block_size = meta.num_decodes, k_cache.shape[1]
    if nd:
        length = max(meta.seq_lens_host[:nd])
        tables = meta.block_tables[:nd, : -(-length // block_size)].long()
        keys = _as(k_cache[tables].flatten(1, 2)[:, :length].transpose(1, 2), q)  # (nd, Hkv, S, D)
        values = _as(v_cache[tables].flatten(1, 2)[:, :length].transpose(1, 2), q)
        lens = meta.seq_lens[:nd].long()
        k_pos = torch.arange(length, device=q.device)
        allowed = k_pos[None, :] < lens[:, None]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > lens[:, None] - 1 - window)
        queries = q[0, :, :nd].transpose(0, 1)[:, :, None]  # (nd, H, 1, D)
        out[0, :, :nd] = sdpa(queries, keys, values, mask=allowed[:, None, None]).squeeze(2).transpose(0, 1)
    for s in range(nd, meta.num_seqs):
        start, end = meta.query_start_host[s], meta.query_start_host[s + 1]
        length, num_queries = meta.seq_lens_host[s], end - start
        keys = _as(_gather(k_cache, meta.block_tables[s], length)[None], q)
        values = _as(_gather(v_cache, meta.block_tables[s], length)[None], q)
        queries = q[:, :, start:end]
        if length == num_queries and window is None:
            out[:, :, start:end] = sdpa(queries, keys, values, is_causal=True)
            continue
        q_pos = torch.arange(length - num_queries, length, device=q.device)
        k_pos = torch.arange(length, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        out[:, :, start:end] = sdpa(queries, keys, values, mask=allowed[None, None])
    return out

"""The paged KV cache: a pool of fixed-size blocks per layer, block tables, and prefix caching.

`PagedKVCache` owns the tensors, (layers, blocks, block_size, kv_heads, head_dim) for k and v,
allocated once. `BlockManager` hands out block ids, reference-counts them, and remembers full
blocks by a hash of their tokens chained with the previous block's hash, so a request that
shares a prefix (a system prompt, few-shot examples) maps the same blocks instead of
recomputing them. Free blocks that still hold a cached prefix are evicted least recently
freed first, so they stay reusable as long as possible. Written here rather than borrowed:
it is ~200 lines and its invariants (tested with a hypothesis state machine) are the engine's.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lmstack.config import ModelConfig
from lmstack.errors import ConfigError


def block_hash(previous: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Hash of one full block: its tokens chained with the hash of every block before it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(previous or b"\0")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class PagedKVCache:
    """k and v for every layer as one pool of blocks; slot s of the pool is block s // block_size.

    One extra block at the end (`scratch_block`) is never handed out: padded rows of a CUDA
    graph batch write their keys there, so real blocks are never touched by padding.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        shape = (config.num_layers, num_blocks + 1, block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and computed (prefix caching)


class BlockManager:
    """Allocates, frees and reference-counts blocks; finds cached prefixes by chained hashes.

    A sequence (anything with `token_ids`, `block_table`, `block_hashes` and
    `num_registered_blocks`) owns the blocks in its block table, one reference each.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> id of the block holding those tokens

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def full_block_hashes(self, seq, num_tokens: int) -> list[bytes]:
        """Hashes of the full blocks among the first num_tokens tokens (memoised on the sequence)."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_tokens // bs):
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[: num_tokens // bs]

    def cached_prefix(self, seq, max_tokens: int) -> list[int]:
        """Ids of cached blocks that hold the first tokens of `seq` (at most max_tokens of them)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self.full_block_hashes(seq, max_tokens):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, num_new_blocks: int, hits: list[int] = ()) -> bool:
        """Whether num_new_blocks fresh blocks fit after taking the (possibly free) cached hits."""
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return num_new_blocks <= len(self.free) - reclaimed

    # ---- changes ---------------------------------------------------------------------------
    def take_prefix(self, seq, hits: list[int]) -> None:
        """Start a sequence's block table with cached blocks (one more reference each)."""
        assert not seq.block_table, "prefix hits are only taken by a sequence without blocks"
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_registered_blocks = len(hits)

    def grow(self, seq, num_tokens: int) -> None:
        """Make the block table cover num_tokens tokens (caller checked `can_allocate`)."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the cached prefix this block still held
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def release(self, seq) -> None:
        """Drop the sequence's references; blocks that reach zero become free (cached ones last)."""
        for block_id in reversed(seq.block_table):  # tail blocks are evicted before the shared head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)  # nothing cached: reuse it first
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def register(self, seq, num_computed_tokens: int) -> None:
        """Publish the sequence's newly completed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self.full_block_hashes(seq, num_computed_tokens)
        for i in range(seq.num_registered_blocks, len(hashes)):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, len(hashes))

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after the weights changed)."""
        for block in self.blocks:
            block.hash = None
        self.cached.clear()

    # ---- invariants (tests) ------------------------------------------------------------------
    def check(self, live_sequences) -> None:
        """Assert that every block is free xor owned, and ref counts equal the number of owners."""
        owners = [0] * self.num_blocks
        for seq in live_sequences:
            assert len(set(seq.block_table)) == len(seq.block_table), "a block appears twice in one table"
            for block_id in seq.block_table:
                owners[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == owners[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but {owners[block.block_id]} owners")
            assert (block.ref_count == 0) == (block.block_id in self.free), f"block {block.block_id} free/used mismatch"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, f"cached hash of block {block_id} is stale"
        bs = self.block_size
        for seq in live_sequences:  # published blocks hold exactly the tokens their hashes say
            previous = None
            for i in range(seq.num_registered_blocks):
                previous = block_hash(previous, seq.token_ids[i * bs:(i + 1) * bs])
                assert seq.block_hashes[i] == previous, f"sequence {seq.seq_id}: stale hash of its block {i}"
                block = self.blocks[seq.block_table[i]] if i < len(seq.block_table) else None
                assert block is None or block.hash in (None, previous), f"block {block.block_id} has a wrong hash"

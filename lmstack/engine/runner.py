"""One batched forward over every scheduled token against the paged KV cache.

The runner flattens a step into input_ids (1, N) with per-token positions and cache slots,
builds the attention metadata, and returns logits only for the rows the engine asks for
(each sequence's last token, or whole prompt chunks for prompt logprobs). Attention runs
through `reference_attention` (any device) or the Triton kernel (CUDA). Decode-only steps
replay a CUDA graph captured per batch-size bucket, with the batch padded to the bucket
(padding rows write to the cache's scratch block), as nano-vllm and vLLM do; metadata for
graphs lives in fixed buffers that each step fills in place, so nothing grows on the hot path.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from lmstack.engine import triton_attention
from lmstack.engine.attention import AttentionMetadata, PagedAttentionContext, reference_attention
from lmstack.engine.kv_cache import PagedKVCache
from lmstack.engine.scheduler import ScheduledSequence
from lmstack.errors import ConfigError
from lmstack.model.transformer import Transformer

BACKENDS = ("auto", "reference", "triton")


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values to a device tensor without synchronising: pinned memory and a non-blocking copy
    (a plain copy would wait for every kernel queued before it, stalling async scheduling)."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """nano-vllm's buckets: 1, 2, 4, 8, then every 16 up to max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"attention_backend={name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_attention.available() else "reference"
    if name == "triton" and not triton_attention.available():
        raise ConfigError("attention_backend='triton' needs the triton package (it ships with CUDA builds of "
                          "torch); use attention_backend='reference'")
    return name


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: PagedKVCache, *, backend: str = "auto",
                 cuda_graphs: bool = True, max_num_seqs: int = 256, max_model_len: int = 2048):
        self.model = model
        self.kv = kv_cache
        self.device = model.device
        self.backend = resolve_backend(backend, self.device)
        self.attention = triton_attention.triton_attention if self.backend == "triton" else reference_attention
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.group = model.config.num_heads // model.config.num_kv_heads
        # Graphs need a forward without host synchronisation: MoE routing is data-dependent.
        self.use_graphs = (cuda_graphs and self.device.type == "cuda" and self.backend == "triton"
                           and model.config.mlp != "moe")
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = []
        if self.use_graphs:
            self._capture(graph_batch_sizes(max_num_seqs))

    # ---- inputs -------------------------------------------------------------------------------
    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    @staticmethod
    def _fill(buffer: torch.Tensor, values) -> None:
        """Copy host values into a slice of a fixed device buffer (one pinned H2D copy)."""
        buffer.copy_(torch.as_tensor(values, dtype=buffer.dtype).pin_memory(), non_blocking=True)

    def _host_inputs(self, scheduled: list[ScheduledSequence]):
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens = []
        width = max(-(-s.end // bs) for s in scheduled)
        tables = np.zeros((len(scheduled), width), dtype=np.int32)
        for i, s in enumerate(scheduled):
            seq, table = s.seq, s.seq.block_table
            tables[i, : len(table)] = table
            if s.num_tokens == 1:
                tokens.append(seq.token_ids[s.start])
                positions.append(s.start)
                slots.append(table[s.start // bs] * bs + s.start % bs)
            else:
                pos = np.arange(s.start, s.end)
                tokens.extend(seq.token_ids[s.start:s.end])
                positions.extend(range(s.start, s.end))
                slots.extend((np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            query_start.append(query_start[-1] + s.num_tokens)
            seq_lens.append(s.end)
        return tokens, positions, slots, query_start, seq_lens, tables

    def _metadata(self, scheduled, slots, query_start, seq_lens, tables) -> AttentionMetadata:
        num_decodes = sum(1 for s in scheduled if s.num_tokens == 1)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.long), query_start=self._tensor(query_start, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32), block_tables=self._tensor(tables, torch.int32),
            num_decodes=num_decodes, query_start_host=query_start, seq_lens_host=seq_lens,
        )
        if self.backend == "triton":
            _, block_q = triton_attention.query_rows(self.group, num_decodes == len(scheduled))
            qblock_seq, qblock_start = [], []
            for i in range(len(scheduled)):
                for first in range(query_start[i], query_start[i + 1], block_q):
                    qblock_seq.append(i)
                    qblock_start.append(first)
            meta.qblock_seq = self._tensor(qblock_seq, torch.int32)
            meta.qblock_start = self._tensor(qblock_start, torch.int32)
            meta.block_q = block_q
        return meta

    # ---- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSequence], keep_rows: list[int], fed=None) -> torch.Tensor:
        """Logits (len(keep_rows), vocab) in float32 for the given rows of the flat batch.

        fed: (rows, tokens, sources): input tokens that are still on the device (sampled by the
        step before, not read back yet): input row rows[i] is tokens[sources[i]].
        """
        tokens, positions, slots, query_start, seq_lens, tables = self._host_inputs(scheduled)
        n = len(tokens)
        if self.graphs and n == len(scheduled) and n <= self.graph_sizes[-1] and keep_rows == list(range(n)):
            return self._replay(tokens, positions, slots, seq_lens, tables, fed)
        meta = self._metadata(scheduled, slots, query_start, seq_lens, tables)
        context = PagedAttentionContext(self.kv.k, self.kv.v, meta, self.attention)
        input_ids = self._tensor(tokens, torch.long)[None]
        self._feed(input_ids[0], fed)
        pos = self._tensor(positions, torch.long)[None]
        keep = self._tensor(keep_rows, torch.long)
        logits = self.model(input_ids, positions=pos, kv_cache=context, logits_to_keep=keep).logits
        return logits[0].float()

    # ---- CUDA graphs --------------------------------------------------------------------------
    def _capture(self, sizes: list[int]) -> None:
        max_bs, dev = sizes[-1], self.device
        self.g_input_ids = torch.zeros(1, max_bs, dtype=torch.long, device=dev)
        self.g_positions = torch.zeros(1, max_bs, dtype=torch.long, device=dev)
        self.g_slots = torch.full((max_bs,), self.kv.scratch_slot, dtype=torch.long, device=dev)
        self.g_seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_tables = torch.full((max_bs, self.max_blocks_per_seq), self.kv.scratch_block,
                                   dtype=torch.int32, device=dev)
        self.g_query_start = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_qblock = torch.arange(max_bs, dtype=torch.int32, device=dev)
        pool = None
        for bs in reversed(sizes):  # largest first, so smaller graphs reuse its memory pool
            meta = AttentionMetadata(
                slot_mapping=self.g_slots[:bs], query_start=self.g_query_start[: bs + 1],
                seq_lens=self.g_seq_lens[:bs], block_tables=self.g_tables[:bs], num_decodes=bs,
                query_start_host=list(range(bs + 1)), seq_lens_host=[1] * bs,
                qblock_seq=self.g_qblock[:bs], qblock_start=self.g_qblock[:bs], block_q=1,
            )
            context = PagedAttentionContext(self.kv.k, self.kv.v, meta, self.attention)
            args = (self.g_input_ids[:, :bs],)
            kwargs = dict(positions=self.g_positions[:, :bs], kv_cache=context)
            with torch.inference_mode():
                self.model(*args, **kwargs)  # warm up: compiles the decode kernel variant
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model(*args, **kwargs).logits
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize()
        self.graph_sizes = sorted(self.graphs)

    def _feed(self, input_ids: torch.Tensor, fed) -> None:
        if fed is not None:
            rows, tokens, sources = fed
            input_ids.index_copy_(0, self._tensor(rows, torch.long),
                                  tokens.index_select(0, self._tensor(sources, torch.long)))

    def _replay(self, tokens, positions, slots, seq_lens, tables, fed) -> torch.Tensor:
        n = len(tokens)
        bs = self.graph_sizes[bisect.bisect_left(self.graph_sizes, n)]
        self._fill(self.g_input_ids[0, :n], tokens)
        self._feed(self.g_input_ids[0], fed)
        self._fill(self.g_positions[0, :n], positions)
        self._fill(self.g_slots[:n], slots)
        self._fill(self.g_seq_lens[:n], seq_lens)
        self._fill(self.g_tables[:n, : tables.shape[1]], tables)
        if bs > n:  # padding rows: one key in the scratch block, written to the scratch slot
            self.g_slots[n:bs].fill_(self.kv.scratch_slot)
            self.g_seq_lens[n:bs].fill_(1)
            self.g_tables[n:bs, 0].fill_(self.kv.scratch_block)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[0, :n].float()


@torch.inference_mode()
def profile_peak_memory(model: Transformer, max_num_batched_tokens: int, max_num_seqs: int) -> None:
    """Run the largest step once without a cache so the allocator's peak includes activations."""
    n, device = max_num_batched_tokens, model.device
    ids = torch.zeros(1, n, dtype=torch.long, device=device)
    positions = torch.arange(n, device=device)[None] % model.config.max_position_embeddings
    keep = torch.arange(min(n, max_num_seqs), device=device)
    model(ids, positions=positions, logits_to_keep=keep)

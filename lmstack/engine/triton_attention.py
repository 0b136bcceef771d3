"""Paged attention in one Triton kernel: prefill chunks and decodes in the same launch.

One program handles `block_q` query tokens of one sequence and one KV head: the query rows
are those tokens times the query heads that share the KV head (GQA), so each key block is
read once per group. It walks the sequence's block table a tile of keys at a time (tiles
need not match the cache's block size), applies the causal and sliding-window masks by
position, and keeps an online softmax in float32 (FlashAttention's recurrence). An fp8 cache
(`kv_cache_dtype="fp8"`) is read as fp8 and converted to the query's dtype in registers. Decode
batches replay it inside CUDA graphs, so its launch metadata lives in fixed tensors.
We own this kernel because no installed library attends over our block layout; it is
checked against `attention.reference_attention` (CUDA tests, and TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

from lmstack.engine.attention import AttentionMetadata

BLOCK_N = 64  # keys per tile
PREFILL_BLOCK_M = 64  # query rows (tokens x grouped heads) per program when a step has prompts


def available() -> bool:
    return triton is not None


def query_rows(num_groups: int, decode_only: bool) -> tuple[int, int]:
    """(block_m, block_q): query rows per program, and query tokens per program."""
    if decode_only:
        return max(16, triton.next_power_of_2(num_groups)), 1
    block_m = max(PREFILL_BLOCK_M, triton.next_power_of_2(num_groups))
    return block_m, block_m // num_groups


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        Q, K, V, Out, block_tables, seq_lens, query_start, qblock_seq, qblock_start,
        stride_qn, stride_qh, stride_on, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
        scale_log2,
        WINDOW: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.load(qblock_seq + pid)
        first = tl.load(qblock_start + pid)
        q_begin = tl.load(query_start + seq)
        q_end = tl.load(query_start + seq + 1)
        length = tl.load(seq_lens + seq)
        context = length - (q_end - q_begin)  # tokens cached before this step

        rows = tl.arange(0, BLOCK_M)
        token = first + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_valid = (rows < BLOCK_Q * GROUP) & (token < q_end)
        q_pos = context + token - q_begin
        dims = tl.arange(0, HEAD_DIM_P2)
        dim_valid = dims < HEAD_DIM
        q = tl.load(Q + token[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :],
                    mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

        last = tl.minimum(first + BLOCK_Q, q_end) - 1  # last query token of this program
        hi = context + last - q_begin + 1  # keys [lo, hi) can be seen by some row
        lo = 0
        if WINDOW > 0:  # skip whole tiles that slid out of every row's window
            lo = (tl.maximum(context + first - q_begin - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_valid = keys < hi
            page = tl.load(block_tables + seq * stride_bt + keys // BLOCK_SIZE, mask=key_valid, other=0)
            offset = page.to(tl.int64) * stride_kb + (keys % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
            kv_mask = key_valid[:, None] & dim_valid[None, :]
            k = tl.load(K + offset[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            allowed = (keys[None, :] <= q_pos[:, None]) & key_valid[None, :]
            if WINDOW > 0:
                allowed = allowed & (keys[None, :] > q_pos[:, None] - WINDOW)
            s = tl.where(allowed, s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offset[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + token[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :],
                 acc.to(Out.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def triton_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, window: int | None) -> torch.Tensor:
    """q (1, H, N, D) against one layer's cache (blocks, block_size, Hkv, D) -> (1, H, N, D)."""
    _, num_heads, num_tokens, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    qt = q[0].transpose(0, 1)  # (N, H, D): a view, the kernel reads it with strides
    if qt.stride(-1) != 1:
        qt = qt.contiguous()
    out = torch.empty(num_tokens, num_heads, head_dim, device=q.device, dtype=q.dtype)
    block_m = max(16, triton.next_power_of_2(meta.block_q * group))
    grid = (meta.qblock_seq.shape[0], num_kv_heads)
    _paged_attention_kernel[grid](
        qt, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start,
        meta.qblock_seq, meta.qblock_start,
        qt.stride(0), qt.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        math.log2(math.e) / math.sqrt(head_dim),
        WINDOW=window or 0, GROUP=group, BLOCK_Q=meta.block_q, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_P2=max(16, triton.next_power_of_2(head_dim)),
        IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=1 if q.dtype == torch.float32 else 2,  # fp32 tiles (tests) are twice as big
    )
    return out.transpose(0, 1)[None]

"""Paged attention: the reference path against a dense float64 computation, the Triton kernel
against the reference (CPU interpreter and CUDA), and the CUDA runner's fast path and graphs."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmstack.engine.attention import AttentionMetadata, reference_attention

# (query tokens, tokens already cached) per sequence: decodes first, then prompt chunks
CASES = [
    dict(qlens=[1, 1, 1], ctxs=[5, 20, 0], window=None, heads=(4, 2), head_dim=16, block_size=4),
    dict(qlens=[1, 1, 7, 30], ctxs=[5, 20, 0, 9], window=None, heads=(4, 2), head_dim=16, block_size=4),
    dict(qlens=[1, 3, 70], ctxs=[100, 40, 5], window=8, heads=(4, 2), head_dim=32, block_size=16),
    dict(qlens=[1, 1], ctxs=[70, 3], window=8, heads=(6, 2), head_dim=16, block_size=4),
    dict(qlens=[2, 33], ctxs=[0, 67], window=None, heads=(4, 4), head_dim=16, block_size=5),
]


def make_case(qlens, ctxs, window, heads, head_dim, block_size, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    num_blocks = sum(-(-(q + c) // block_size) for q, c in zip(qlens, ctxs)) + 3
    k_cache = torch.randn(num_blocks + 1, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks + 1, block_size, num_kv_heads, head_dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, out-of-order blocks
    width = max(-(-(q + c) // block_size) for q, c in zip(qlens, ctxs))
    tables, lens, starts = [], [], [0]
    for q, c in zip(qlens, ctxs):
        n = -(-(q + c) // block_size)
        tables.append([free.pop() for _ in range(n)] + [0] * (width - n))
        lens.append(q + c)
        starts.append(starts[-1] + q)
    q = torch.randn(1, num_heads, starts[-1], head_dim, generator=gen)
    as_dev = dict(device=device)
    meta = AttentionMetadata(
        slot_mapping=None, query_start=torch.tensor(starts, dtype=torch.int32, **as_dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, **as_dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, **as_dev),
        num_decodes=sum(1 for n in qlens if n == 1), query_start_host=starts, seq_lens_host=lens)
    cast = dict(device=device, dtype=dtype)
    return q.to(**cast), k_cache.to(**cast), v_cache.to(**cast), meta, window


def dense_float64(q, k_cache, v_cache, meta, window):
    """Each sequence alone, keys laid out contiguously, softmax(q k^T / sqrt(d)) v in float64."""
    q, k_cache, v_cache = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[2]
    block_size = k_cache.shape[1]
    for s in range(meta.num_seqs):
        start, end, length = meta.query_start_host[s], meta.query_start_host[s + 1], meta.seq_lens_host[s]
        table = meta.block_tables[s].cpu().tolist()
        keys = torch.stack([k_cache[table[p // block_size], p % block_size] for p in range(length)], 1)
        values = torch.stack([v_cache[table[p // block_size], p % block_size] for p in range(length)], 1)
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # (H, L, D)
        scores = q[0, :, start:end] @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])
        q_pos = torch.arange(length - (end - start), length)[:, None]
        k_pos = torch.arange(length)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        out[0, :, start:end] = F.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values
    return out


def with_query_blocks(meta, group, decode_only):
    from lmstack.engine import triton_attention

    _, block_q = triton_attention.query_rows(group, decode_only)
    seqs, firsts = [], []
    for s in range(meta.num_seqs):
        for first in range(meta.query_start_host[s], meta.query_start_host[s + 1], block_q):
            seqs.append(s)
            firsts.append(first)
    device = meta.seq_lens.device
    meta.qblock_seq = torch.tensor(seqs, dtype=torch.int32, device=device)
    meta.qblock_start = torch.tensor(firsts, dtype=torch.int32, device=device)
    meta.block_q = block_q
    return meta


@pytest.mark.parametrize("case", CASES)
def test_reference_attention_equals_dense_float64(case):
    q, k, v, meta, window = make_case(**case)
    out = reference_attention(q, k, v, meta, window)
    assert (out.double() - dense_float64(q, k, v, meta, window)).abs().max() < 1e-5


def as_fp8(cache: torch.Tensor) -> torch.Tensor:
    """A cache as `kv_cache_dtype="fp8"` stores it (what write_kv does to every key and value)."""
    from lmstack.engine.attention import to_cache_dtype

    cache = cache.clone()
    cache.view(-1)[::97] *= 1000  # a few values beyond the format's +-448: they must be clamped, not NaN
    return to_cache_dtype(cache, torch.float8_e4m3fn)


@pytest.mark.parametrize("case", CASES[1:3])
def test_reference_attention_reads_an_fp8_cache_exactly(case):
    q, k, v, meta, window = make_case(**case)
    k8, v8 = as_fp8(k), as_fp8(v)
    assert k8.float().abs().max() == 448 and torch.isfinite(k8.float()).all()  # clamped, never NaN
    out = reference_attention(q, k8, v8, meta, window)
    # the float64 reference over the very values the fp8 cache holds: only float32 rounding differs
    ref = dense_float64(q, k8.float(), v8.float(), meta, window)
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


TRITON_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests/engine")
from test_paged_attention import CASES, make_case, with_query_blocks, dense_float64
from lmstack.engine.triton_attention import triton_attention
for case in CASES:
    q, k, v, meta, window = make_case(**case)
    group = case["heads"][0] // case["heads"][1]
    meta = with_query_blocks(meta, group, decode_only=all(n == 1 for n in case["qlens"]))
    err = (triton_attention(q, k, v, meta, window).double() - dense_float64(q, k, v, meta, window)).abs().max()
    assert err < 1e-5, (case, float(err))
from test_paged_attention import as_fp8
for case in CASES[1:3]:  # an fp8 cache, converted to the query dtype inside the kernel
    q, k, v, meta, window = make_case(**case)
    k, v = as_fp8(k), as_fp8(v)
    group = case["heads"][0] // case["heads"][1]
    meta = with_query_blocks(meta, group, decode_only=False)
    ref = dense_float64(q, k.float(), v.float(), meta, window)
    err = (triton_attention(q, k, v, meta, window).double() - ref).abs().max()
    assert err < 1e-5 * ref.abs().max(), (case, float(err))
print("ok")
"""


def test_triton_kernel_in_interpreter_equals_dense():
    """The CUDA kernel's own code, run by Triton's CPU interpreter (skipped where triton is absent)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---- CUDA -----------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_attention_equals_reference_on_cuda(case, dtype):
    from lmstack.engine.triton_attention import triton_attention

    q, k, v, meta, window = make_case(**case, device="cuda", dtype=dtype)
    group = case["heads"][0] // case["heads"][1]
    expected = dense_float64(q, k, v, meta, window)
    for decode_only in {False, all(n == 1 for n in case["qlens"])}:
        meta = with_query_blocks(meta, group, decode_only)
        out = triton_attention(q, k, v, meta, window).double().cpu()
        ref = reference_attention(q, k, v, meta, window).double().cpu()
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: output rounding alone reaches ~1e-2
        assert (out - expected).abs().max() < tol
        assert (ref - expected).abs().max() < tol


def _runner_pair(family, dtype, fast_graphs):
    """A reference runner and a Triton runner (optionally with CUDA graphs) over twin caches."""
    from engine_helpers import tiny_model

    from lmstack.engine.kv_cache import BlockManager, PagedKVCache
    from lmstack.engine.runner import ModelRunner
    from lmstack.engine.scheduler import Scheduler, SchedulerConfig

    model = copy.deepcopy(tiny_model(family)).to(device="cuda", dtype=dtype)  # the cached CPU model stays
    runners = []
    for backend, graphs in (("reference", False), ("triton", fast_graphs)):
        kv = PagedKVCache(model.config, 64, 4, "cuda", dtype)
        runners.append(ModelRunner(model, kv, backend=backend, cuda_graphs=graphs, max_num_seqs=8,
                                   max_model_len=256))
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24, max_model_len=256),
                          BlockManager(64, 4, enable_prefix_caching=False))
    return model, runners, scheduler


def _lockstep(runner_a, runner_b, scheduler, lengths, steps, tol):
    """Feed both runners the same schedule (mixed prefill chunks and decodes); compare every logit."""
    from engine_helpers import prompts

    from lmstack.engine.sequence import Request, Sequence
    from lmstack.infer import SamplingParams

    for i, p in enumerate(prompts(lengths, seed=9)):
        request = Request(str(i), None, p, SamplingParams(), arrival_order=i)
        scheduler.add(Sequence(i, request, 0, list(p), len(p)))
    for _ in range(steps):
        out = scheduler.schedule()
        rows = list(range(out.num_tokens))
        a, b = runner_a.run(out.scheduled, rows), runner_b.run(out.scheduled, rows)
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() <= tol * max(scale, 1.0)
        scheduler.update(out)
        offset = 0
        for s in out.scheduled:
            offset += s.num_tokens
            if s.completes:
                s.seq.token_ids.append(int(a[offset - 1].argmax()))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen3", "mistral", "mixtral"])
def test_fast_path_logits_equal_reference_path(family):
    """Triton attention + CUDA graphs vs gather + SDPA, same model and schedule, bf16 and fp32."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        _, (ref, fast), scheduler = _runner_pair(family, dtype, fast_graphs=True)
        _lockstep(ref, fast, scheduler, [3, 17, 40, 9, 25], steps=30, tol=tol)


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager():
    from lmstack.engine.kv_cache import PagedKVCache
    from lmstack.engine.runner import ModelRunner

    model, (_, eager), scheduler = _runner_pair("llama", torch.bfloat16, fast_graphs=False)
    graphed = ModelRunner(model, PagedKVCache(model.config, 64, 4, "cuda", torch.bfloat16), backend="triton",
                          cuda_graphs=True, max_num_seqs=8, max_model_len=256)
    assert graphed.graphs, "no CUDA graph was captured"
    replays = []
    replay = graphed._replay
    graphed._replay = lambda *a: replays.append(1) or replay(*a)
    # same kernels; only the GEMM shapes differ (the batch is padded to the graph's bucket)
    _lockstep(eager, graphed, scheduler, [5, 9, 3, 12, 7], steps=25, tol=2e-2)
    assert replays, "decode steps did not use the graphs"

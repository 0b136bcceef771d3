"""Offline throughput of the batched engine (`lmstack.LLM`) on nano-vllm's workload.

The workload is nano-vllm's bench.py exactly: `random.seed(0)`, 256 requests of random token
ids (0..10000), prompt and output lengths uniform in [100, 1024], temperature 0.6,
ignore_eos, so every request generates exactly its max_tokens; throughput = requested output
tokens / wall time of one `generate` call (after a warm-up). The model has Qwen3-0.6B's shapes
(preset qwen3-0.6b) with random bf16 weights. Published anchor: nano-vllm 1,434 tok/s and vLLM
1,362 tok/s on an 8 GB laptop RTX 4070.

Side by side in the same run (GPU): transformers' batched `generate()` on the same model (saved
and reloaded, so the weights are identical) on the first --hf-requests requests, left-padded
in batches of --hf-batch-size; each batch runs to its longest request, and only the tokens
the requests asked for count as output (padding work is reported separately, as "raw").
On CPU: a scaled-down workload on a small model against sequential `infer.generate` per prompt.

    python benchmarks/bench_engine.py --device cuda                  # the H100 run (~2-4 min)
    python benchmarks/bench_engine.py --device cpu                   # scaled down, small model
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time

import torch
from common import markdown_table, report, synchronize

import lmstack
from lmstack.config import get_preset
from lmstack.engine import LLM, SamplingParams


def workload(num: int, min_len: int, max_len: int, vocab_hi: int, temperature: float, seed: int = 0):
    """nano-vllm's generator: prompt ids first, then each request's max_tokens, from one seeded RNG."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab_hi) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]
    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=rng.randint(min_len, max_len))
              for _ in range(num)]
    return prompts, params


def cpu_config():
    """A small Qwen3 (about 11M parameters) so the CPU run finishes in a minute or two."""
    return get_preset("tiny-qwen3").replace(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                                            num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=1024)


def engine_options(args, **changes) -> dict:
    options = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   max_model_len=args.max_model_len, block_size=args.block_size, fuse_pointwise=args.fuse_pointwise,
                   kv_cache_dtype=args.kv_cache_dtype)
    if args.device == "cuda":
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        options["num_blocks"] = args.num_blocks
    return {**options, **changes}


def run_engine(model, prompts, params, args, async_scheduling=None):
    start = time.perf_counter()
    llm = LLM(model, **engine_options(args, async_scheduling=async_scheduling))
    setup = time.perf_counter() - start
    # warm-up: a few real-sized requests, so mixed prefill/decode steps of the timed run find their
    # Triton kernels compiled (they specialise on sizes); reversed prompts share no prefix-cache blocks
    warm = [list(reversed(p))[:256] for p in prompts[:8]]
    llm.generate(warm, [SamplingParams(max_tokens=16, ignore_eos=True)] * len(warm), use_tqdm=False)
    before = llm.stats()
    spans = _record_gpu_spans(llm) if args.device == "cuda" else None
    synchronize(args.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=args.progress)
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(p.max_tokens for p in params), "ignore_eos: every request must reach max_tokens"
    stats = llm.stats()
    info = dict(setup_s=setup, steps=stats.num_steps_total - before.num_steps_total,
                preemptions=stats.num_preemptions_total - before.num_preemptions_total,
                blocks=stats.kv_blocks_total, backend=llm.engine.runner.backend,
                graphs=len(llm.engine.runner.graphs), overlap=llm.engine.async_scheduling)
    if spans is not None:  # GPU time from each step's first copy to its last sampling kernel
        info["gpu_s"] = sum(a.elapsed_time(b) for a, b in spans) / 1000
    if spans is not None:
        import lmstack.engine.core as core_module

        core_module.sample = core_module.sampling_sample
    del llm, outs
    gc.collect()  # the timing wrappers and the runner reference each other
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return generated, elapsed, info


def _record_gpu_spans(llm) -> list:
    """CUDA events around every step's GPU work (inputs, forward, sampling), to split wall time
    into GPU time and host time (scheduling, bookkeeping) that the GPU waits for."""
    import lmstack.engine.core as core_module

    spans, runner = [], llm.engine.runner
    run, sample = runner.run, core_module.sample
    core_module.sampling_sample = sample

    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def timed_run(*a, **k):
        begin = event()
        logits = run(*a, **k)
        spans.append([begin, event()])  # steps that only prefill end here
        return logits

    def timed_sample(*a, **k):
        tokens = sample(*a, **k)
        spans[-1][1] = event()
        return tokens

    runner.run, core_module.sample = timed_run, timed_sample
    return spans


KERNEL_GROUPS = (  # (group, lower-case name fragments), first match wins; for the --profile breakdown
    ("attention", ("paged_attention", "flash", "attention", "fmha", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "::mm", "bmm", "addmm", "linear")),
    ("copy / gather", ("memcpy", "memset", "copy", "cat", "index", "gather", "scatter", "fill")),
    ("sampling", ("exponential", "argmax", "softmax", "distribution", "topk", "sort", "multinomial")),
    ("norm / rope / activation / add", ("elementwise", "vectorized", "unrolled", "reduce", "triton_", "pow",
                                         "rsqrt", "mean", "silu", "mul", "add")),
)


def kernel_group(name: str) -> str:
    lower = name.lower()
    return next((group for group, parts in KERNEL_GROUPS if any(p in lower for p in parts)), "other")


def profile_engine(model, prompts, params, args, skip: int, steps: int) -> tuple[str, str]:
    """Where a step's time goes: the kernels of `steps` engine steps after the first `skip` (the
    decode-heavy middle of the run), grouped by kind; returns (grouped table, top-kernels table)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    llm = LLM(model, **engine_options(args))
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=8), use_tqdm=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    runner, run = llm.engine.runner, llm.engine.runner.run
    with profile(activities=activities, schedule=schedule(wait=skip, warmup=2, active=steps, repeat=1)) as prof:
        def stepped_run(*a, **k):
            prof.step()
            return run(*a, **k)

        runner.run = stepped_run
        llm.generate(prompts, params, use_tqdm=False)
        synchronize(args.device)
    runner.run = run
    device_side = args.device == "cuda"
    totals: dict[str, list[float]] = {}
    kernels = []
    for e in prof.key_averages():
        us = e.self_device_time_total if device_side else e.self_cpu_time_total
        if us <= 0 or e.key.startswith("ProfilerStep") or (device_side and e.device_type.name != "CUDA"):
            continue
        group = kernel_group(e.key)
        totals.setdefault(group, [0.0, 0])
        totals[group][0] += us
        totals[group][1] += e.count
        kernels.append((us, e.count, group, e.key))
    all_us = sum(t[0] for t in totals.values()) or 1.0
    grouped = markdown_table(
        ["kernel group", "ms per step", "launches per step", "share"],
        [[g, f"{us / steps / 1000:.2f}", f"{n / steps:,.0f}", f"{100 * us / all_us:.0f}%"]
         for g, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
        + [["all", f"{all_us / steps / 1000:.2f}", f"{sum(t[1] for t in totals.values()) / steps:,.0f}", "100%"]])
    top = markdown_table(["kernel", "group", "ms per step", "launches per step"],
                         [[name[:90], g, f"{us / steps / 1000:.3f}", f"{n / steps:,.0f}"]
                          for us, n, g, name in sorted(kernels, reverse=True)[:20]])
    del llm
    gc.collect()
    return grouped, top


def run_transformers(model, prompts, params, args):
    """transformers' generate() on the same weights; returns (useful tokens, raw tokens, seconds)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype).to(args.device).eval()
    subset = list(zip(prompts, params))[: args.hf_requests]
    batch_size = args.hf_batch_size
    while True:
        try:
            return (*_hf_batches(hf, subset, batch_size, args), batch_size)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2  # transformers' cache did not fit: retry with smaller batches
            torch.cuda.empty_cache()
            print(f"transformers ran out of memory; retrying with batches of {batch_size}")


def _hf_batches(hf, subset, batch_size, args):
    useful = raw = 0
    elapsed = 0.0
    for i in range(0, len(subset), batch_size):
        batch = subset[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=args.device)
        new = max(sp.max_tokens for _, sp in batch)
        synchronize(args.device)
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                        max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        synchronize(args.device)
        elapsed += time.perf_counter() - start
        useful += sum(sp.max_tokens for _, sp in batch)
        raw += len(batch) * new
    return useful, raw, elapsed


def run_sequential(model, prompts, params, args):
    """`infer.generate` on one prompt at a time (the single-request path)."""
    from lmstack.infer import GenerationConfig, generate

    start = time.perf_counter()
    generated = 0
    for p, sp in zip(prompts, params):
        out = generate(model, [p], GenerationConfig(max_new_tokens=sp.max_tokens, temperature=sp.temperature,
                                                     ignore_eos=True))
        generated += len(out[0].outputs[0].token_ids)
    return generated, time.perf_counter() - start


def decode_attention_bandwidth(config, batch: int, context: int, block_size: int) -> tuple[float, float]:
    """GB/s of K+V read by one decode attention call (Triton kernel, reference path) at this batch."""
    from lmstack.engine import triton_attention
    from lmstack.engine.attention import AttentionMetadata, reference_attention

    dev, dtype = "cuda", torch.bfloat16
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq
    shape = (num_blocks + 1, block_size, config.num_kv_heads, config.head_dim)
    k, v = torch.randn(shape, device=dev, dtype=dtype), torch.randn(shape, device=dev, dtype=dtype)
    tables = torch.randperm(num_blocks, device=dev, dtype=torch.int32).view(batch, per_seq)
    q = torch.randn(1, config.num_heads, batch, config.head_dim, device=dev, dtype=dtype)
    seq = torch.arange(batch, device=dev, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=None, query_start=torch.arange(batch + 1, device=dev, dtype=torch.int32),
                             seq_lens=torch.full((batch,), context, device=dev, dtype=torch.int32),
                             block_tables=tables, num_decodes=batch, query_start_host=list(range(batch + 1)),
                             seq_lens_host=[context] * batch, qblock_seq=seq, qblock_start=seq, block_q=1)
    gb = 2 * batch * context * config.num_kv_heads * config.head_dim * 2 / 1e9
    rates = []
    for fn in (triton_attention.triton_attention, reference_attention):
        for _ in range(3):
            fn(q, k, v, meta, None)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fn(q, k, v, meta, None)
        torch.cuda.synchronize()
        rates.append(gb * 20 / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default=None, help="model shapes (default: qwen3-0.6b on cuda, a small qwen3 on cpu)")
    ap.add_argument("--num-requests", type=int, default=None, help="default 256 on cuda, 32 on cpu")
    ap.add_argument("--min-len", type=int, default=None, help="default 100 on cuda, 16 on cpu")
    ap.add_argument("--max-len", type=int, default=None, help="default 1024 on cuda, 128 on cpu")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--num-blocks", type=int, default=4096, help="CPU only: KV blocks in the pool")
    ap.add_argument("--hf-requests", type=int, default=None,
                    help="requests given to transformers (cuda default 128; 0 skips it; cpu compares with "
                         "sequential infer.generate instead)")
    ap.add_argument("--hf-batch-size", type=int, default=128, help="halved automatically on out-of-memory")
    ap.add_argument("--sequential-requests", type=int, default=None,
                    help="CPU: requests run one at a time through infer.generate (default: all)")
    ap.add_argument("--sync-too", action="store_true",
                    help="also run the engine without async scheduling (one step at a time), as a row")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--progress", action="store_true", help="show the engine's progress bar")
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    ap.add_argument("--profile", type=int, nargs=2, metavar=("SKIP", "STEPS"), default=None,
                    help="instead of the throughput run: profile STEPS engine steps after the first SKIP and print "
                         "where a step's time goes, kernels grouped by kind (e.g. --profile 200 20)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="the engine's KV cache dtype (fp8: half of bf16's bytes per cached token)")
    ap.add_argument("--fuse-pointwise", action="store_true",
                    help="run the engine with fuse_pointwise=True (compiled norm/RoPE/activation kernels)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    num = args.num_requests or (256 if cuda else 32)
    lo, hi = args.min_len or (100 if cuda else 16), args.max_len or (1024 if cuda else 128)
    if args.hf_requests is None:
        args.hf_requests = 128 if cuda else 0
    dtype = torch.bfloat16 if cuda else torch.float32
    config = get_preset(args.preset) if args.preset else (get_preset("qwen3-0.6b") if cuda else cpu_config())
    model, _ = lmstack.load(args.preset or "qwen3-0.6b", random_init=True, dtype=dtype, device=args.device, seed=0,
                            config=config)
    prompts, params = workload(num, lo, hi, min(10000, config.vocab_size - 1), args.temperature)
    name = args.preset or ("qwen3-0.6b" if cuda else "small qwen3 (4 layers, hidden 256)")
    if args.profile:
        grouped, top = profile_engine(model, prompts, params, args, *args.profile)
        print(f"{name}, {num} requests: engine steps {args.profile[0] + 2}-{sum(args.profile) + 1} (1-based) "
              f"({'GPU kernel' if cuda else 'CPU op'} self time; fuse_pointwise={args.fuse_pointwise})")
        print(grouped + "\n\n" + top)
        return

    generated, elapsed, info = run_engine(model, prompts, params, args)
    engine_rate = generated / elapsed
    prompt_tokens = sum(map(len, prompts))
    rows = [["lmstack LLM (paged, continuous batching)", f"{num}", f"{generated:,}", f"{elapsed:.1f}",
             f"{engine_rate:,.0f}", f"{(generated + prompt_tokens) / elapsed:,.0f}", "1.00x"]]
    notes = [f"{name}, {str(dtype).removeprefix('torch.')}, random weights; {num} requests, prompt/output lengths "
             f"uniform [{lo}, {hi}] (seed 0, random ids), temperature {args.temperature}, ignore_eos",
             f"engine: backend={info['backend']}, CUDA graphs={info['graphs']}, async scheduling={info['overlap']}, "
             f"fuse_pointwise={args.fuse_pointwise}, kv_cache_dtype={args.kv_cache_dtype}, "
             f"block_size={args.block_size}, "
             f"KV blocks={info['blocks']:,}, max_num_seqs={args.max_num_seqs}, max_num_batched_tokens="
             f"{args.max_num_batched_tokens}, {info['steps']} steps, {info['preemptions']} preemptions, "
             f"setup {info['setup_s']:.1f} s (pool sizing + graph capture, not timed)"]
    if "gpu_s" in info:
        notes.append(f"engine wall {elapsed:.2f} s = GPU busy {info['gpu_s']:.2f} s + host-only "
                     f"{elapsed - info['gpu_s']:.2f} s ({1000 * elapsed / info['steps']:.1f} ms/step)")
    if args.sync_too:
        sync_generated, sync_elapsed, sync_info = run_engine(model, prompts, params, args, async_scheduling=False)
        rows.append(["lmstack LLM, async scheduling off", f"{num}", f"{sync_generated:,}", f"{sync_elapsed:.1f}",
                     f"{sync_generated / sync_elapsed:,.0f}", f"{(sync_generated + prompt_tokens) / sync_elapsed:,.0f}",
                     f"{engine_rate / (sync_generated / sync_elapsed):.2f}x faster"])
        if "gpu_s" in sync_info:
            notes.append(f"async scheduling off: GPU busy {sync_info['gpu_s']:.2f} s + host-only "
                         f"{sync_elapsed - sync_info['gpu_s']:.2f} s")
    print(f"engine: {generated:,} output tokens in {elapsed:.1f} s = {engine_rate:,.0f} tok/s; " + "; ".join(notes[1:]),
          flush=True)
    if args.hf_requests:
        useful, raw, hf_elapsed, hf_batch = run_transformers(model, prompts, params, args)
        hf_rate = useful / hf_elapsed
        rows.append([f"transformers generate() (first {min(args.hf_requests, num)} requests, batch "
                     f"{hf_batch})", f"{min(args.hf_requests, num)}", f"{useful:,}", f"{hf_elapsed:.1f}",
                     f"{hf_rate:,.0f}", "", f"{engine_rate / hf_rate:.1f}x faster"])
        notes.append(f"transformers: {raw:,} tokens generated incl. padding to each batch's longest request "
                     f"({raw / hf_elapsed:,.0f} raw tok/s); only the {useful:,} requested tokens count")
    if not cuda:
        subset = args.sequential_requests or num
        seq_generated, seq_elapsed = run_sequential(model, prompts[:subset], params[:subset], args)
        seq_rate = seq_generated / seq_elapsed
        rows.append([f"sequential infer.generate ({subset} requests, one at a time)", f"{subset}",
                     f"{seq_generated:,}", f"{seq_elapsed:.1f}", f"{seq_rate:,.0f}", "",
                     f"{engine_rate / seq_rate:.1f}x faster"])
        notes.append(f"torch threads {torch.get_num_threads()}; shared machine, absolute CPU figures drift with load")
    if cuda:
        avg_context = int(sum(len(p) + sp.max_tokens / 2 for p, sp in zip(prompts, params)) / num)
        fast, ref = decode_attention_bandwidth(config, min(num, args.max_num_seqs), avg_context, args.block_size)
        peak = torch.cuda.get_device_properties(0)
        notes.append(f"decode attention alone (batch {min(num, args.max_num_seqs)}, context {avg_context}, one layer): "
                     f"Triton kernel reads K+V at {fast:,.0f} GB/s, gather+SDPA reference at {ref:,.0f} GB/s "
                     f"({peak.name})")
    table = markdown_table(["", "requests", "output tokens", "seconds", "output tok/s", "total tok/s",
                            "engine speed-up"], rows)
    report("bench_engine: offline throughput, nano-vllm workload", table, "; ".join(notes), args.no_record)


if __name__ == "__main__":
    main()

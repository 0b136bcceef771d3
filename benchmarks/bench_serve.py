"""HTTP overhead of `lmstack serve`: requests/s and time to first token, server vs the engine used directly.

The same workload (random token-id prompts, greedy, `ignore_eos`, streamed) runs at several
concurrency levels against `AsyncEngine` in this process and against `lmstack serve` (a
subprocess on a loopback port, through `/v1/completions` with SSE), in interleaved rounds.
The ratio server/engine is the cost of HTTP, JSON, SSE and detokenization. The model is a
preset with random weights and a word-level tokenizer as large as its vocabulary (every
token decodes to text), saved to a temporary Hugging Face directory.

    python benchmarks/bench_serve.py                    # CPU: tiny-llama, concurrency 1,4,16,64
    python benchmarks/bench_serve.py --device cuda --preset qwen3-0.6b --dtype bfloat16 \\
        --prompt-len 256 --max-tokens 128 --concurrency 1,8,32,128 --max-num-seqs 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import append_results, markdown_table

import lmstack


def build_model_dir(directory: Path, preset: str, vocab: int | None, dtype: str) -> Path:
    """A random-weight preset plus a word-level tokenizer over its whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = lmstack.get_preset(preset)
    if vocab:
        config = config.replace(vocab_size=vocab)
    config = config.replace(eos_token_id=config.vocab_size - 1, bos_token_id=0)
    model, _ = lmstack.load(preset, random_init=True, config=config, seed=0)
    model.save_pretrained(directory, dtype=None if dtype == "auto" else dtype)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{config.vocab_size - 1}"}))
    return directory


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def run_level(submit, prompts: list[list[int]], concurrency: int) -> tuple[float, list[float]]:
    """Run every prompt with `concurrency` workers; returns (seconds, TTFTs)."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts: list[float] = []

    async def worker() -> None:
        while not queue.empty():
            ttfts.append(await submit(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, ttfts


def direct_submitter(engine, max_tokens: int):
    from lmstack.infer.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def submit(ids: list[int]) -> float:
        start, ttft = time.perf_counter(), None
        async for out in engine.generate(ids, params):
            if ttft is None and any(c.token_ids for c in out.outputs):
                ttft = time.perf_counter() - start
        return ttft

    return submit


def http_submitter(client, max_tokens: int):
    async def submit(ids: list[int]) -> float:
        body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        start, ttft = time.perf_counter(), None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                    ttft = time.perf_counter() - start
        return ttft

    return submit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, engine_args: list[str]) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "lmstack.cli", "serve", str(model_dir), "--port", str(port), "--log-level", "warning",
           "--max-waiting", "100000", *engine_args]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy in 10 minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny-llama")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(16, 4 x concurrency)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (engine, server) per level")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="KV blocks of each engine (default: max_num_seqs full contexts, the same pool for both; "
                         "both engines are alive at once, so it is not sized from free memory)")
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = ap.parse_args()
    import httpx

    from lmstack.engine import AsyncEngine

    levels = [int(c) for c in args.concurrency.split(",")]
    rng = random.Random(0)
    max_model_len = args.prompt_len + args.max_tokens + 16
    num_blocks = args.num_blocks or -(-args.max_num_seqs * max_model_len // 16)
    options = dict(max_num_seqs=args.max_num_seqs, num_blocks=num_blocks, block_size=16, max_model_len=max_model_len)
    engine_args = ["--device", args.device, "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
                   "--max-model-len", str(max_model_len), "--num-blocks", str(num_blocks), "--block-size", "16"]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = build_model_dir(Path(tmp), args.preset, args.vocab, args.dtype)
        vocab = lmstack.get_preset(args.preset).vocab_size if not args.vocab else args.vocab

        def workload(level: int) -> list[list[int]]:
            n = args.requests_per_level or max(16, 4 * level)
            return [[rng.randrange(1, vocab - 1) for _ in range(args.prompt_len)] for _ in range(n)]

        loads = {level: workload(level) for level in levels}
        warm = workload(1)[:2]
        # (kind, level) -> per-round req/s, and every TTFT of every round
        rates: dict[tuple[str, int], list[float]] = {}
        ttfts: dict[tuple[str, int], list[float]] = {}

        def record(kind: str, level: int, seconds: float, times: list[float]) -> None:
            rates.setdefault((kind, level), []).append(len(loads[level]) / seconds)
            ttfts.setdefault((kind, level), []).extend(times)
            print(f"round {len(rates[(kind, level)])} {kind:6s} c={level:4d}: {len(loads[level]) / seconds:8.2f} req/s",
                  flush=True)

        port = free_port()
        server = start_server(model_dir, port, engine_args)
        engine = AsyncEngine(str(model_dir), device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                             **options)
        try:
            async def run_all() -> None:
                limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as c:
                    submitters = {"engine": direct_submitter(engine, args.max_tokens),
                                  "server": http_submitter(c, args.max_tokens)}
                    for submit in submitters.values():
                        await run_level(submit, warm, 2)
                    # Interleaved rounds: machine noise hits both sides alike.
                    for _ in range(args.rounds):
                        for level in levels:
                            for kind, submit in submitters.items():
                                seconds, times = await run_level(submit, loads[level], level)
                                record(kind, level, seconds, times)
                await engine.shutdown()

            asyncio.run(run_all())
        finally:
            server.terminate()
            server.wait(60)

    rows = []
    for level in levels:
        e_rate, h_rate = statistics.median(rates[("engine", level)]), statistics.median(rates[("server", level)])
        e_t, h_t = ttfts[("engine", level)], ttfts[("server", level)]
        rows.append([level, len(loads[level]), f"{e_rate:.2f}", f"{h_rate:.2f}", f"{h_rate / e_rate:.2f}x",
                     f"{1000 * percentile(e_t, .5):.1f} / {1000 * percentile(e_t, .99):.1f}",
                     f"{1000 * percentile(h_t, .5):.1f} / {1000 * percentile(h_t, .99):.1f}"])
    table = markdown_table(["concurrency", "requests", "engine req/s", "server req/s", "server/engine",
                            "engine TTFT p50 / p99 (ms)", "server TTFT p50 / p99 (ms)"], rows)
    notes = (f"{args.preset} (random weights, {vocab} vocab), {args.device}, dtype {args.dtype}, prompt "
             f"{args.prompt_len} random token ids, {args.max_tokens} greedy tokens with ignore_eos, streamed; "
             f"{args.rounds} interleaved rounds (req/s: median of rounds, TTFT: all rounds pooled); engine: "
             "AsyncEngine in the benchmark process; server: `lmstack serve` subprocess on 127.0.0.1, httpx client, "
             f"SSE /v1/completions; both engines: max_num_seqs {args.max_num_seqs}, {num_blocks} KV blocks of 16")
    if args.device == "cpu":
        notes += "; shared 2-core machine, absolute figures are noisy, the ratio is the result"
    print(table)
    if not args.no_record:
        append_results("bench_serve: HTTP server vs engine used directly", table, notes)


if __name__ == "__main__":
    main()

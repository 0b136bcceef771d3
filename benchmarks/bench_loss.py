"""Peak memory and time of the LM head + cross-entropy, forward and backward: full logits against
`loss_chunk_tokens` (lmstack/model/chunked_loss.py).

The default shapes are a Llama-3-sized vocabulary (128,256) with a 1B model's hidden size (2,048)
on 4,096 tokens. Each variant runs in its own subprocess so the CPU peak (max RSS) is its own;
on CUDA the allocator's peak is read instead.

    python benchmarks/bench_loss.py --device cpu --tokens 2048
    python benchmarks/bench_loss.py --device cuda --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import markdown_table, report


def one_variant(args) -> dict:
    from lmstack.model.chunked_loss import chunked_cross_entropy
    from lmstack.model.transformer import cross_entropy

    torch.manual_seed(0)
    device, dtype = args.device, getattr(torch, args.dtype)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(args.repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if args.chunk:
            loss = chunked_cross_entropy(hidden, weight, labels, args.chunk)
        else:
            loss = cross_entropy((hidden @ weight.t())[None], labels[None], shift_labels=False)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is in KiB on Linux; the inputs were allocated before base_rss was read
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 2**20
    return {"ms": 1000 * sorted(times)[len(times) // 2], "peak_gib": peak, "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunks", default="0,1024,4096", help="comma list of loss_chunk_tokens (0: full logits)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # one variant, in a subprocess
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.chunk is not None:
        print(json.dumps(one_variant(args)))
        return
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        cmd = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
               "--chunk", str(chunk)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        name = "full logits" if chunk == 0 else f"loss_chunk_tokens={chunk}"
        rows.append([name, f"{r['ms']:.0f}", f"{r['peak_gib']:.2f}", f"{r['loss']:.6f}"])
        print(rows[-1], flush=True)
    peak_kind = "allocator peak" if args.device == "cuda" else "max RSS growth"
    table = markdown_table(["LM head + cross-entropy, fwd+bwd", "ms (median)", f"peak GiB ({peak_kind})", "loss"], rows)
    notes = (f"{args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, {args.device}; median of "
             f"{args.repeats} runs after one warm-up, each variant in its own process; equal losses show the same math")
    report("bench_loss: chunked LM head + cross-entropy vs full logits", table, notes, args.no_record)


if __name__ == "__main__":
    main()

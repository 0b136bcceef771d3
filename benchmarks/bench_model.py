"""Forward+backward throughput of lmstack's GPT-2 124M against transformers' GPT2LMHeadModel.

Same shapes, same dtype, same compile setting, measured side by side in one process with the
two models' steps interleaved, so machine noise hits both alike. Reports tokens/s, the ratio
lmstack/transformers and (on GPU) MFU against the bf16 dense peak.

    python benchmarks/bench_model.py                                  # CPU, fp32, eager
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --compile true --batch 12 --seq 1024
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import report, throughput_table, timed

import lmstack

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 spec sheets


def build_models(vocab: int, device: str, dtype: torch.dtype, compile_: bool):
    import transformers

    cfg = lmstack.get_preset("gpt2").replace(vocab_size=vocab)
    torch.manual_seed(0)
    ours = lmstack.Transformer(cfg).to(device=device, dtype=dtype)
    hf_cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_cfg._attn_implementation = "sdpa"
    theirs = transformers.GPT2LMHeadModel(hf_cfg).to(device=device, dtype=dtype)
    ours.train()
    theirs.train()
    if compile_:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    return cfg, ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", default="false", choices=["true", "false"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50257, help="50304 = GPT-2's vocab padded to a multiple of 64")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each times --steps steps per model")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = ap.parse_args()
    # bf16 on CUDA is mixed precision (fp32 weights, bf16 autocast), as training runs it.
    dtype = torch.float32 if args.device.startswith("cuda") else getattr(torch, args.dtype)
    torch.set_float32_matmul_precision("high")
    cfg, ours, theirs = build_models(args.vocab, args.device, dtype, args.compile == "true")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda")
                and args.dtype == "bfloat16" else contextlib.nullcontext())

    def step_ours():
        with autocast:
            loss = ours(ids, labels=ids).loss
        loss.backward()
        for p in ours.parameters():
            p.grad = None

    def step_theirs():
        with autocast:
            loss = theirs(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in theirs.parameters():
            p.grad = None

    for _ in range(args.warmup):
        step_ours()
        step_theirs()
    times = {"lmstack": [], "transformers": []}
    for _ in range(args.rounds):
        times["lmstack"].append(timed(lambda: [step_ours() for _ in range(args.steps)], args.device) / args.steps)
        times["transformers"].append(timed(lambda: [step_theirs() for _ in range(args.steps)], args.device) / args.steps)
    peak = next((v for k, v in PEAK_FLOPS.items() if args.device.startswith("cuda")
                 and k in torch.cuda.get_device_name()), None)
    table = throughput_table("model (GPT-2 124M, fwd+bwd)", times, args.batch * args.seq,
                             cfg.flops_per_token(args.seq), peak)
    notes = (f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}, {args.dtype}, compile={args.compile}, "
             f"{args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps each")
    report("bench_model: GPT-2 124M forward+backward vs transformers", table, notes, args.no_record)


if __name__ == "__main__":
    main()

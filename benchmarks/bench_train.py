"""Training benchmarks, each measured side by side in one run.

shakespeare: nanoGPT's Shakespeare-char baseline. nanoGPT's own loop (a faithful re-implementation,
`nanogpt_reference.py`, MIT) and lmstack (byte tokenizer -> `data prepare` -> `Trainer`) train the
same configuration on the same 90/10 split of tinyshakespeare; reports validation loss (in-loop
estimate and the whole validation split) and wall time.
gpt2: GPT-2 124M shapes, full training steps (forward, backward, clip, fused AdamW) with the
lmstack Trainer, transformers' GPT2LMHeadModel and nanoGPT's model, interleaved; tokens/s and MFU.

    python benchmarks/bench_train.py shakespeare --device cpu          # nanoGPT's CPU config, 2000 iters
    python benchmarks/bench_train.py shakespeare --device cuda         # 6L/6H/384, ctx 256, 5000 iters
    python benchmarks/bench_train.py gpt2 --device cuda                # batch 12 x 1024, bf16, compiled
    python benchmarks/bench_train.py gpt2 --device cuda --variants default,cudnn --skip-nanogpt
    python benchmarks/bench_train.py gpt2 --device cpu --batch 2 --seq 128 --rounds 3 --steps 1
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import markdown_table, report, synchronize, throughput_table, timed

SHAKESPEARE = {
    # nanoGPT README's CPU command on config/train_shakespeare_char.py
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, lr_decay_iters=2000,
                dropout=0.0, eval_iters=20, compile=False),
    # config/train_shakespeare_char.py as published (val loss 1.4697)
    "cuda": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000,
                 lr_decay_iters=5000, dropout=0.2, eval_iters=200, compile=True),
}


# ---- (a) Shakespeare-char ---------------------------------------------------------------------------
def prepare_bytes(text_path: Path, work: Path) -> tuple[Path, Path, float]:
    """256-byte tokenizer and token shards of the first 90% (train) and last 10% (val), as nanoGPT splits."""
    from lmstack.data import PrepareConfig, prepare
    from lmstack.tokenizer import Tokenizer

    start = time.perf_counter()
    text = text_path.read_text()
    cut = int(len(text) * 0.9)
    (work / "train.txt").write_text(text[:cut])
    (work / "val.txt").write_text(text[cut:])
    tokenizer = Tokenizer.train([text], vocab_size=256, special_tokens=["<|eos|>"], bos_token=None,
                                eos_token="<|eos|>", pad_token=None)
    tokenizer.save(work / "tokenizer")
    dirs = []
    for split in ("train", "val"):
        out = work / f"data-{split}"
        prepare(PrepareConfig(inputs=[str(work / f"{split}.txt")], tokenizer=str(work / "tokenizer"), out=str(out),
                              val_fraction=0.0, text_piece_bytes=1 << 24, workers=1, progress=False))
        dirs.append(out)
    return dirs[0], dirs[1], time.perf_counter() - start


def full_val_loss(forward, windows: np.ndarray, batch: int, device: str) -> float:
    """Mean next-token loss over every non-overlapping window of the validation text."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = torch.from_numpy(windows[i:i + batch].astype(np.int64)).to(device)
            logits = forward(w[:, :-1].contiguous()).float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += w[:, 1:].numel()
    return total / count


def windows_of(ids: np.ndarray, block: int) -> np.ndarray:
    n = (len(ids) - 1) // block
    return np.stack([ids[k * block:k * block + block + 1] for k in range(n)])


def run_nanogpt(text: str, device: str, s: dict) -> dict:
    from nanogpt_reference import TrainSettings, train

    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = len(data)
    settings = TrainSettings(device=device, **s)
    result = train(data[: int(n * 0.9)], data[int(n * 0.9):], len(chars), settings,
                   log=lambda m: print(m, flush=True))
    model = result["model"]
    model.eval()
    windows = windows_of(data[int(n * 0.9):], s["block_size"])
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    with ctx:
        result["full_val"] = full_val_loss(lambda x: model(x, x)[0], windows, 64, device)
    return result


def run_lmstack(train_dir: Path, val_dir: Path, out: Path, device: str, s: dict, seed: int) -> dict:
    from lmstack.train import TrainConfig, Trainer

    config = TrainConfig(
        model="tiny-gpt2", data=str(train_dir), val_data=str(val_dir), out_dir=str(out),
        model_overrides=dict(num_layers=s["n_layer"], num_heads=s["n_head"], hidden_size=s["n_embd"],
                             intermediate_size=4 * s["n_embd"], max_position_embeddings=s["block_size"],
                             activation="gelu", attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False),
        seq_len=s["block_size"], batch_size=s["batch_size"], max_steps=s["max_iters"], lr=1e-3, min_lr=1e-4,
        schedule="cosine", warmup_steps=100, decay_steps=s["lr_decay_iters"], weight_decay=0.1,
        decay_embeddings=True, beta1=0.9, beta2=0.99, grad_clip=1.0, dropout=s["dropout"], compile=s["compile"],
        eval_every=250, eval_batches=s["eval_iters"], save_every=0, log_every=50, device=device, seed=seed,
        sample_prompt="ROMEO:", sample_tokens=64, tensorboard=False,
    )
    start = time.perf_counter()
    trainer = Trainer(config)
    summary = trainer.fit()
    wall = time.perf_counter() - start
    model = trainer.raw_model.eval()
    windows = np.stack([np.concatenate([x[i].numpy(), y[i, -1:].numpy()])
                        for x, y in trainer.val_data.iter_eval_batches(64) for i in range(len(x))])
    with trainer.autocast():
        full = full_val_loss(lambda x: model(x).logits, windows, 64, device)
    return {"val_loss": summary["val loss"], "best_val_loss": summary["best val loss"], "wall_s": wall, "train_s": summary["train time (s)"], "full_val": full,
            "params": summary["parameters"]}


def bench_shakespeare(args) -> None:
    device = args.device
    s = dict(SHAKESPEARE["cuda" if device.startswith("cuda") else "cpu"])
    if args.iters:
        s.update(max_iters=args.iters, lr_decay_iters=args.iters)
    text_path = Path(args.data)
    if not text_path.is_file():
        raise SystemExit(f"{text_path} not found: pass --data path/to/tinyshakespeare.txt")
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rows, results = [], {}
    try:
        train_dir, val_dir, prep_s = prepare_bytes(text_path, work)
        order = ["nanoGPT", "lmstack"] if args.order == "nanogpt-first" else ["lmstack", "nanoGPT"]
        for name in order:
            if name == "nanoGPT" and args.skip_nanogpt:
                continue
            print(f"--- {name} ---", flush=True)
            if name == "nanoGPT":
                results[name] = run_nanogpt(text_path.read_text(), device, s)
            else:
                results[name] = run_lmstack(train_dir, val_dir, work / "run", device, s, args.seed)
        for name in ("nanoGPT", "lmstack"):
            if name in results:
                r = results[name]
                rows.append([name, f"{r['best_val_loss']:.4f}", f"{r['val_loss']:.4f}", f"{r['full_val']:.4f}",
                             f"{r['wall_s']:.1f}",
                             f"{1000 * r['train_s'] / s['max_iters']:.1f}"])
        if len(results) == 2:
            ratio = results["nanoGPT"]["wall_s"] / results["lmstack"]["wall_s"]
            rows.append(["wall-time ratio nanoGPT/lmstack", "", "", "", f"{ratio:.2f}x", ""])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(["Shakespeare-char", "best val loss (in-loop, nanoGPT's figure)", "final val loss (in-loop)",
                            "final val loss (whole val split)",
                            "wall s", "ms/iter (train steps)"], rows)
    notes = (f"{s['n_layer']}L/{s['n_head']}H/{s['n_embd']} wide, context {s['block_size']}, batch {s['batch_size']}, "
             f"{s['max_iters']} iters, lr 1e-3 cosine to 1e-4, dropout {s['dropout']}, compile={s['compile']}; "
             f"eval every 250 iters on {s['eval_iters']} batches (nanoGPT: train and val splits, lmstack: val). "
             f"nanoGPT: 65-char vocabulary, random windows; lmstack: 256-byte tokenizer (+EOS, head padded to 320 "
             f"rows), GPT-2 family without linear biases as nanoGPT's bias=False (its LayerNorms keep theirs), "
             f"shuffled windows from `data prepare` shards (tokenizer + prepare took {prep_s:.1f} s, not in wall). "
             f"Wall = model build + training loop + evals (lmstack also writes its checkpoint, model, plot and report). "
             f"torch threads: {torch.get_num_threads()}; run order: {args.order}.")
    if device == "cpu":
        notes += " The 2-core machine is shared with other jobs: absolute times vary with their load."
    report("bench_train: Shakespeare-char, nanoGPT vs lmstack", table, notes, args.no_record)


# ---- (b) GPT-2 124M training throughput ------------------------------------------------------------
class RandomTokens:
    """Uniform random token windows (throughput only): the TokenDataset interface, generated on the fly."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab_size, self.seq_len, self.g = vocab, seq_len, torch.Generator().manual_seed(0)

    def next_batch(self, batch_size: int):
        ids = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), generator=self.g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def attention_preference(variant: str):
    """cudnn: prefer cuDNN's fused attention (fast on Hopper) over FlashAttention-2 in SDPA."""
    import contextlib

    if variant != "cudnn":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def make_lmstack_step(args, out: Path, variant: str):
    from lmstack.train import TrainConfig, Trainer

    config = TrainConfig(model="gpt2", model_overrides={"vocab_size": args.vocab}, out_dir=str(out / variant),
                         seq_len=args.seq, batch_size=args.batch, max_steps=10**6, warmup_steps=10, lr=6e-4,
                         min_lr=6e-5, compile=args.compile == "true", device=args.device, eval_every=0, save_every=0,
                         progress=False, tensorboard=False,
                         compile_mode="max-autotune-no-cudagraphs" if variant == "max-autotune" else "default",
                         loss_chunk_tokens=4096 if variant == "chunked-loss" else 0)
    trainer = Trainer(config, train_data=RandomTokens(args.vocab, args.seq))
    trainer.model.train()

    def run(n: int) -> float:
        """n steps as `Trainer.fit` runs them with log_every=n: each step reads back the previous
        step's loss (the host stays at most one step ahead), the last waits for all."""
        with attention_preference(variant):
            for _ in range(n):
                trainer.launch_step()
                trainer.settle(keep=1)
            return trainer.settle()

    return run, trainer.raw_model.flops_per_token(args.seq)


def make_loop_step(model, args, forward):
    """The same step as the Trainer's (autocast, backward, clip 1.0, fused AdamW), hand-written; like
    nanoGPT's loop, which reads the loss only every log_interval steps, n steps read it once."""
    device = args.device
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=True)
    if args.compile == "true":
        model = torch.compile(model)
    data = RandomTokens(args.vocab, args.seq)
    bf16 = device.startswith("cuda")

    def step():
        x, y = (t.to(device, non_blocking=True) for t in data.next_batch(args.batch))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(n: int) -> float:
        return [step() for _ in range(n)][-1].item()

    return run


def bench_gpt2(args) -> None:
    import transformers
    from nanogpt_reference import GPT, GPTConfig

    device = args.device
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    work = Path(tempfile.mkdtemp(prefix="bench_train_gpt2_"))
    steps, flops_per_token = {}, None
    try:
        for variant in args.variants.split(","):
            name = "lmstack" if variant == "default" else f"lmstack ({variant})"
            steps[name], flops_per_token = make_lmstack_step(args, work, variant)
        hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf_cfg._attn_implementation = "sdpa"
        hf = transformers.GPT2LMHeadModel(hf_cfg).to(device).train()
        steps["transformers"] = make_loop_step(hf, args, lambda m, x, y: m(input_ids=x, labels=x).loss)
        if not args.skip_nanogpt:
            ng = GPT(GPTConfig(block_size=1024, vocab_size=args.vocab, n_layer=12, n_head=12, n_embd=768,
                               bias=False)).to(device).train()
            steps["nanoGPT model + loop"] = make_loop_step(ng, args, lambda m, x, y: m(x, y)[1])
        peaks = {}
        for name, run in steps.items():
            t0 = time.perf_counter()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # the other variants' models stay allocated
            run(args.warmup)
            synchronize(device)
            if device.startswith("cuda"):
                peaks[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30
            print(f"{name}: warm-up (incl. compile) {time.perf_counter() - t0:.1f} s", flush=True)
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, run in steps.items():
                times[name].append(timed(lambda run=run: run(args.steps), device) / args.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from lmstack.train.logging import peak_flops

    peak = peak_flops(torch.device(device), "bf16")
    table = throughput_table("GPT-2 124M training step", times, args.batch * args.seq, flops_per_token, peak)
    precision = "bf16 autocast" if device.startswith("cuda") else "fp32"
    notes = (f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}, {precision}, compile={args.compile}; a step = "
             f"forward, backward, clip 1.0, fused AdamW; the loss is read back once per {args.steps} steps "
             f"(lmstack: every step one step late, and all at the block's end, as `Trainer.fit` with "
             f"log_every={args.steps}); "
             f"{args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps; "
             f"torch threads: {torch.get_num_threads()}.")
    if peaks:
        notes += (" Peak GPU memory of a warm-up above what was allocated before it (every variant's weights stay "
                  "allocated, so this is activations, gradients, optimizer state made then, temporaries; GiB): ") + ", ".join(f"{n} {g:.1f}" for n, g in peaks.items()) + "."
    if device == "cpu":
        notes += " The 2-core machine is shared with other jobs: compare the ratio, not absolute figures."
    report("bench_train: GPT-2 124M training throughput vs transformers", table, notes, args.no_record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["shakespeare", "gpt2"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    ap.add_argument("--skip-nanogpt", action="store_true", help="leave out the nanoGPT side")
    ap.add_argument("--seed", type=int, default=1337)
    sh = ap.add_argument_group("shakespeare")
    sh.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    sh.add_argument("--iters", type=int, default=0, help="override the iteration count (0: the config's)")
    sh.add_argument("--order", default="nanogpt-first", choices=["nanogpt-first", "lmstack-first"])
    g = ap.add_argument_group("gpt2")
    g.add_argument("--batch", type=int, default=12)
    g.add_argument("--seq", type=int, default=1024)
    g.add_argument("--vocab", type=int, default=50304)
    g.add_argument("--compile", default=None, choices=["true", "false"], help="default: true on CUDA")
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--steps", type=int, default=10)
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--variants", default="default",
                   help="comma-separated lmstack variants: default, cudnn (cuDNN attention first), "
                        "max-autotune (compile_mode max-autotune-no-cudagraphs; minutes to compile), "
                        "chunked-loss (loss_chunk_tokens=4096: no full logits)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile is None:
        args.compile = "true" if args.device.startswith("cuda") else "false"
    if args.workload == "shakespeare":
        bench_shakespeare(args)
    else:
        bench_gpt2(args)


if __name__ == "__main__":
    main()

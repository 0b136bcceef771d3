"""`lmstack quickstart`: corpus -> tokenizer -> shards -> a small Llama-style model, on this machine.

Uses only lmstack's public pieces (the `stdlib` corpus, `Tokenizer.train`, `data.prepare`,
`Trainer`, `infer.generate`), so it is also the shortest example of the whole pipeline. The
size is picked for the hardware: on a CPU a calibration of a few steps sets the step count to
fit the time budget; on a GPU a larger model trains for a fixed number of steps. The result is
judged against a unigram baseline (val tokens scored by smoothed train-token frequencies).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.errors import ConfigError

MARKER = "quickstart.json"
CODE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n")


@dataclass
class Plan:
    """What quickstart builds on this hardware."""

    corpus_every: int  # use every k-th stdlib file (1: all of them)
    vocab_size: int
    model_overrides: dict[str, Any]
    seq_len: int
    batch_size: int
    lr: float
    max_steps: int | None  # None: calibrated to the time budget
    train_seconds: float
    val_fraction: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig fields


def plan_for(device: torch.device, minutes: float | None) -> Plan:
    if device.type == "cuda":
        # the whole stdlib is ~8M tokens: 1500 steps of 16k tokens is ~3 epochs, so a little dropout
        return Plan(corpus_every=1, vocab_size=8192, seq_len=512, batch_size=32, lr=1.5e-3, max_steps=1500,
                    train_seconds=60 * (minutes or 6), extra={"dropout": 0.1},
                    model_overrides=dict(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4,
                                         intermediate_size=1408, max_position_embeddings=512, rope_scaling=None))
    return Plan(corpus_every=6, vocab_size=2048, seq_len=128, batch_size=16, lr=2e-3, max_steps=None,
                train_seconds=60 * (minutes or 5),
                model_overrides=dict(num_layers=4, hidden_size=192, num_heads=6, num_kv_heads=2,
                                     intermediate_size=512, max_position_embeddings=512, rope_scaling=None))


def unigram_baseline(data_dir: Path) -> tuple[float, int, int]:
    """Cross-entropy (nats/token) of the val tokens under add-one-smoothed train-token frequencies."""
    from lmstack.data.shards import open_split, read_index

    index = read_index(data_dir)
    vocab = int(index["vocab_size"])
    counts = np.ones(vocab, dtype=np.float64)  # add-one (Laplace) smoothing
    n_train = 0
    for shard in open_split(data_dir, index, "train"):
        counts += np.bincount(np.asarray(shard, dtype=np.int64), minlength=vocab)[:vocab]
        n_train += len(shard)
    logp = np.log(counts / counts.sum())
    total, n_val = 0.0, 0
    for shard in open_split(data_dir, index, "val"):
        ids = np.asarray(shard, dtype=np.int64)
        total -= logp[ids].sum()
        n_val += len(ids)
    return total / max(1, n_val), n_train, n_val


def prepare_out_dir(out: Path) -> None:
    """Reuse a directory an earlier quickstart made; refuse to clobber anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"{out} exists and was not made by quickstart; pass --out_dir to an empty or new "
                              "directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"status": "running"}) + "\n")


def calibrate_steps(config, seconds: float, log) -> int:
    """Steps that fit `seconds`, timing a few steps of the same model on the same data.

    On a CPU it also picks the torch thread count: on a machine busy with other work, one
    thread can be several times faster than two whose spin-waits contend for the cores.
    """
    from lmstack.train import Trainer

    probe = Trainer(config.replace(out_dir=str(Path(config.out_dir) / ".calibration"), max_steps=100, progress=False))
    probe.train_step()  # the first step pays one-time costs
    options = [torch.get_num_threads()] if probe.device.type != "cpu" else sorted({1, torch.get_num_threads()})
    timings = {}
    for threads in options:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for _ in range(2):
            probe.train_step()
        timings[threads] = (time.perf_counter() - start) / 2
    threads = min(timings, key=timings.get)
    torch.set_num_threads(threads)
    per_step = timings[threads]
    # evaluations, samples and the final checkpoint add about 10% to the steps themselves
    steps = int(seconds / (per_step * 1.1))
    chosen = max(50, min(steps, 20000)) // 10 * 10  # a multiple of 10: the last of 5 evaluations is the final one
    note = "" if chosen == steps // 10 * 10 else f" (run {chosen}: a quickstart trains 50 to 20000 steps)"
    log(f"calibration: {per_step * 1000:.0f} ms/step with {threads} thread(s) -> {steps} steps in "
        f"{seconds / 60:.1f} min{note}")
    return chosen


def run_quickstart(out_dir: str = "runs/quickstart", device: str = "auto", minutes: float | None = None,
                   seed: int = 0, progress: bool = True, log=print, plan: Plan | None = None) -> dict[str, Any]:
    """Build everything under `out_dir` and return a summary (also written to out_dir/report.md).

    `plan` replaces the hardware-based choice (tests use a tiny one).
    """
    from lmstack.data import PrepareConfig, prepare
    from lmstack.data.sources import stdlib_files
    from lmstack.errors import ConfigError
    from lmstack.tokenizer import Tokenizer
    from lmstack.train import TrainConfig, Trainer
    from lmstack.train.distributed import resolve_device

    if minutes is not None and not (isinstance(minutes, (int, float)) and 0 < minutes < float("inf")):
        raise ConfigError(f"--minutes {minutes} must be a positive number of minutes (or unset for the default)")
    started = time.perf_counter()
    dev = resolve_device(device)
    plan = plan or plan_for(dev, minutes)
    out = Path(out_dir)
    prepare_out_dir(out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    files = stdlib_files()[:: plan.corpus_every]
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    log(f"[1/5] corpus: {len(files)} Python stdlib files ({size_mb:.1f} MB); training a {plan.vocab_size}-token "
        "BPE tokenizer")
    tokenizer = Tokenizer.train(files, plan.vocab_size)
    tokenizer.save(out / "tokenizer")
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[2/5] tokenizing into shards (lmstack data prepare)")
    prepare(PrepareConfig(inputs=[str(f) for f in files], tokenizer=str(out / "tokenizer"), out=str(out / "data"),
                          val_fraction=plan.val_fraction, progress=progress))
    baseline, n_train, n_val = unigram_baseline(out / "data")
    timings["prepare"] = time.perf_counter() - t
    log(f"      {n_train:,} train tokens, {n_val:,} val tokens; unigram baseline {baseline:.3f} nats/token "
        f"(perplexity {math.exp(baseline):.1f})")

    config = TrainConfig(
        model="tiny-llama", model_overrides=plan.model_overrides, data=str(out / "data"), out_dir=str(out),
        seq_len=plan.seq_len, batch_size=plan.batch_size, max_steps=plan.max_steps or 1000, lr=plan.lr,
        min_lr=plan.lr / 10, warmup_steps=50, weight_decay=0.1, device=device, seed=seed, eval_every=0,
        eval_batches=40, save_every=0, log_every=10, sample_prompt=CODE_PROMPTS[0], sample_tokens=48,
        progress=progress,
    )
    config = config.replace(**plan.extra)
    if plan.max_steps is None:
        t = time.perf_counter()
        steps = calibrate_steps(config, plan.train_seconds, log)
        # a warmup of at most a fifth of the run (50 steps from 250 on): a slow machine's 50-step run
        # would otherwise be all warmup (TrainConfig refuses that)
        config = config.replace(max_steps=steps, warmup_steps=min(config.warmup_steps, steps // 5))
        shutil.rmtree(out / ".calibration", ignore_errors=True)
        timings["calibration"] = time.perf_counter() - t
    config = config.replace(eval_every=max(50, config.max_steps // 5))

    t = time.perf_counter()
    trainer = Trainer(config)
    log(f"[3/5] pretraining a {trainer.num_parameters / 1e6:.1f}M-parameter Llama-style model for "
        f"{config.max_steps} steps ({config.batch_size} x {config.seq_len} tokens each) on {dev.type}")
    summary = trainer.fit()
    timings["train"] = time.perf_counter() - t

    log("[4/5] completions of code prompts")
    completions = complete_prompts(trainer.raw_model, trainer.tokenizer, seed)
    for prompt, text in completions:
        log("---\n" + prompt + text)
    val_loss = summary.get("val loss")
    total = time.perf_counter() - started
    result = {
        "val loss (nats/token)": val_loss, "val perplexity": summary.get("val perplexity"),
        "unigram baseline (nats/token)": baseline, "unigram perplexity": math.exp(baseline),
        "below baseline by (nats/token)": baseline - val_loss if val_loss is not None else None,
        "parameters": summary["parameters"], "steps": config.max_steps, "device": dev.type,
        "train tokens seen": summary["tokens"], "corpus files": len(files), "vocab": tokenizer.vocab_size,
        "time": ", ".join(f"{k} {v:.0f} s" for k, v in {**timings, "total": total}.items()),
    }
    write_quickstart_report(out, result, completions)
    (out / MARKER).write_text(json.dumps({"status": "done", **result}, indent=2) + "\n")
    model_dir = out / "model"
    log(f"[5/5] done in {total / 60:.1f} min. Validation loss {val_loss:.3f} nats/token vs unigram baseline "
        f"{baseline:.3f} (perplexity {math.exp(val_loss):.1f} vs {math.exp(baseline):.1f}).")
    log(f"Everything is in {out}/: model/ (Hugging Face directory), report.md, loss.png, metrics.jsonl, data/.")
    log(f"Chat with it:   lmstack chat {model_dir}\nServe it:       lmstack serve {model_dir}\n"
        f"Or in Python:   lmstack.load('{model_dir}')")
    return result


def complete_prompts(model, tokenizer, seed: int) -> list[tuple[str, str]]:
    from lmstack.infer.generate import generate
    from lmstack.infer.params import GenerationConfig

    model.eval()
    options = GenerationConfig(temperature=0.7, top_k=40, max_new_tokens=64, seed=seed)
    outputs = generate(model, list(CODE_PROMPTS), options, tokenizer)
    return [(p, o.outputs[0].text or "") for p, o in zip(CODE_PROMPTS, outputs)]


def write_quickstart_report(out: Path, result: dict[str, Any], completions: list[tuple[str, str]]) -> None:
    from lmstack.train.logging import format_value

    lines = ["", "## Quickstart", "", "| | |", "|---|---|"]
    for key, value in result.items():
        lines.append(f"| {key} | {format_value(value)} |")
    lines += ["", "### Completions", ""]
    for prompt, text in completions:
        lines += ["```python", prompt + text, "```", ""]
    with open(out / "report.md", "a") as f:
        f.write("\n".join(lines) + "\n")

"""Shared pieces of the trainer tests: a quiet tiny config and a trainer on in-memory data."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from toy_data import ToyTokenDataset

from lmstack.train import TrainConfig, Trainer


def tiny_config(out_dir, **changes) -> TrainConfig:
    base = dict(model="tiny-llama", out_dir=str(out_dir), seq_len=16, batch_size=4, max_steps=6, lr=3e-3,
                warmup_steps=2, eval_every=0, save_every=0, log_every=1, eval_batches=2, progress=False,
                tensorboard=False, seed=0)
    base.update(changes)
    return TrainConfig(**base)


def toy_trainer(out_dir, world_size: int = 1, rank: int = 0, **changes) -> Trainer:
    config = tiny_config(out_dir, **changes)
    return Trainer(config, train_data=ToyTokenDataset(config.seq_len, rank=rank, world_size=world_size),
                   val_data=ToyTokenDataset(config.seq_len, rank=rank, world_size=world_size, split="val"))


@contextlib.contextmanager
def one_thread():
    """Runs compared with subprocesses must use the same thread count for bitwise-equal matmuls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The run test_resume.py kills and resumes: checkpoints every 3 steps, dropout on so the RNG matters.
RESUME_RUN = dict(max_steps=12, save_every=3, eval_every=4, dropout=0.1, resume=True, keep_last=2)
# The run test_distributed.py compares across 1 and 2 processes (global batch 4; constant lr after
# warmup so a run stopped at step 10 and resumed to 20 follows the same schedule as one of 20).
DIST_RUN = dict(max_steps=20, batch_size=4, schedule="constant", warmup_steps=3, eval_every=10, save_every=10,
                lr=3e-3)


class Crash(Exception):
    """Raised by `crash_at`: a run dying in the middle of training."""


def crash_at(trainer: Trainer, step: int) -> Trainer:
    """Make `trainer.fit()` raise Crash once `step` steps are done (an in-process stand-in for a kill)."""
    launch = trainer.launch_step

    def launch_or_crash():
        if trainer.step == step:
            raise Crash(f"stopped after step {step}")
        launch()

    trainer.launch_step = launch_or_crash
    return trainer


class ListData:
    """Serves fixed batches in order (SFT-style dicts or pretraining pairs)."""

    def __init__(self, batches, vocab_size=256):
        self.batches, self.vocab_size, self.i = batches, vocab_size, 0

    def next_batch(self, batch_size):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}

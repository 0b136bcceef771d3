"""Shared pieces of the trainer tests: a quiet tiny config and a trainer on in-memory data."""

from __future__ import annotations

import contextlib

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

"""Subprocess of test_distributed.py, run under torchrun with 2 gloo processes on CPU.

DDP trains 20 steps in one go, accumulating 2 micro-batches per step; FSDP2 trains 10, stops, and resumes to 20 (so sharded optimizer
state and per-rank data positions round-trip through a checkpoint). Losses land in metrics.jsonl.
usage: torchrun --nproc_per_node 2 dist_driver.py OUT_ROOT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from toy_data import ToyTokenDataset  # noqa: E402
from train_helpers import DIST_RUN, tiny_config  # noqa: E402

from lmstack.tokenizer import Tokenizer  # noqa: E402
from lmstack.train import Trainer  # noqa: E402


def run(out_dir: str, strategy: str, max_steps: int, resume: bool, tokenizer=None, grad_accum: int = 1) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = tiny_config(out_dir, **{**DIST_RUN, "batch_size": DIST_RUN["batch_size"] // (world * grad_accum),
                                     "grad_accum": grad_accum,
                                     "distributed": strategy, "max_steps": max_steps, "resume": resume,
                                     "sample_every": 10, "sample_tokens": 6, "sample_prompt": "ab"})
    Trainer(config, tokenizer=tokenizer, train_data=ToyTokenDataset(config.seq_len, rank=rank, world_size=world),
            val_data=ToyTokenDataset(config.seq_len, rank=rank, world_size=world, split="val")).fit()


if __name__ == "__main__":
    torch.set_num_threads(1)
    root = sys.argv[1]
    dist.init_process_group("gloo")
    run(f"{root}/ddp", "ddp", 20, resume=False, grad_accum=2)  # 2 ranks x 2 micro-batches of 1
    # with a tokenizer, FSDP also runs sample generations (every rank takes part in the forward)
    byte_tokenizer = Tokenizer.train(["ab" * 64], 256, special_tokens=[], bos_token=None, eos_token=None,
                                     pad_token=None)
    run(f"{root}/fsdp", "fsdp", 10, resume=False, tokenizer=byte_tokenizer)
    run(f"{root}/fsdp", "fsdp", 20, resume=True, tokenizer=byte_tokenizer)
    dist.barrier()  # no rank tears down while another still talks to it (an abort at exit)
    dist.destroy_process_group()

"""DDP and FSDP2 on 2 gloo processes give the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from net_helpers import free_port
from toy_data import ToyTokenDataset
from train_helpers import DIST_RUN, losses, tiny_config

import lmstack
from lmstack.train import Trainer

DRIVER = Path(__file__).with_name("dist_driver.py")


def address_in_use(proc: subprocess.CompletedProcess) -> bool:
    output = (proc.stdout + proc.stderr).lower()
    return "eaddrinuse" in output or "address already in use" in output


def run_torchrun(out_root: Path, attempts: int = 3) -> subprocess.CompletedProcess:
    """dist_driver.py under torchrun with 2 processes. The master port is free when picked but bound
    later by torchrun, so another process may take it meanwhile: then, and only then, run again on a
    fresh port, a bounded number of times, without what a failed try may have written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    for attempt in range(1, attempts + 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(DRIVER), str(out_root)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or not address_in_use(proc) or attempt == attempts:
            return proc
        for strategy in ("ddp", "fsdp"):  # a try cut short may have left a partial run behind
            shutil.rmtree(out_root / strategy, ignore_errors=True)
    raise AssertionError("unreachable")


def test_ddp_and_fsdp_match_one_process(tmp_path):
    config = tiny_config(tmp_path / "single", **DIST_RUN)
    single = Trainer(config, train_data=ToyTokenDataset(config.seq_len),
                     val_data=ToyTokenDataset(config.seq_len, split="val"))
    single.fit()

    proc = run_torchrun(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    expected = losses(tmp_path / "single")
    for strategy in ("ddp", "fsdp"):
        got = losses(tmp_path / strategy)
        assert sorted(got) == list(range(1, 21)), strategy
        worst = max(abs(got[s] - expected[s]) for s in expected)
        assert worst <= 1e-5, (strategy, worst)
        # the checkpoint and export are plain HF directories with the same weights as one process
        model, _ = lmstack.load(tmp_path / strategy / "model")
        for (name, p), q in zip(model.named_parameters(), single.raw_model.parameters()):
            assert torch.allclose(p, q, atol=1e-4), (strategy, name)
    assert "resuming from" in proc.stderr and "step-00000010" in proc.stderr
    samples = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples if "sample" in r] == [10, 20]

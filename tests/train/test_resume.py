"""Exact resume: a run killed with SIGKILL and resumed logs the same loss at every step as one that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_data import ToyTokenDataset
from train_helpers import RESUME_RUN, Crash, crash_at, losses, tiny_config

from lmstack.train import Trainer

DRIVER = Path(__file__).with_name("resume_driver.py")


def run_in_process(out_dir: Path) -> Trainer:
    config = tiny_config(out_dir, **RESUME_RUN)
    trainer = Trainer(config, train_data=ToyTokenDataset(config.seq_len),
                      val_data=ToyTokenDataset(config.seq_len, split="val"))
    trainer.fit()
    return trainer


def logged_losses(out_dir: Path) -> dict[int, float]:
    """`losses` of a run that may still be appending to (or was killed while writing) metrics.jsonl:
    a last line without its newline is not complete yet, so it is left out."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = path.read_text().split("\n")[:-1]  # the piece after the last newline is unfinished (or empty)
    records = [json.loads(line) for line in lines if line]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    run_in_process(reference)

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(killed), "0.15"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if max(logged_losses(killed), default=0) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (killed / "model").exists()  # it really died mid-training
    done_before_kill = max(logged_losses(killed))

    resumed = run_in_process(killed)
    assert resumed.resume_from is not None
    resumed_at = int(resumed.resume_from.name.split("-")[1])
    assert 0 < resumed_at < done_before_kill <= 12

    expected, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    a = load_file(reference / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def test_resume_with_dropout_and_samples_matches_uninterrupted_run(tmp_path):
    """Sampling draws noise from torch's global RNG between steps; a resumed run restarts from the
    streams saved at the checkpoint, so the sample must leave the training streams where they were."""
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["ab" * 64], 256, special_tokens=[], bos_token=None, eos_token=None, pad_token=None)
    settings = dict(max_steps=8, save_every=4, sample_every=2, sample_tokens=4, eval_every=4, dropout=0.1,
                    resume=True)

    def trainer(out_dir):
        config = tiny_config(out_dir, **settings)
        return Trainer(config, tokenizer=tokenizer, train_data=ToyTokenDataset(config.seq_len),
                       val_data=ToyTokenDataset(config.seq_len, split="val"))

    trainer(tmp_path / "reference").fit()
    with pytest.raises(Crash):
        crash_at(trainer(tmp_path / "cut"), 6).fit()  # samples at 2, 4 (after the checkpoint) and 6 were drawn
    resumed = trainer(tmp_path / "cut")
    assert resumed.step == 4
    resumed.fit()
    assert losses(tmp_path / "cut") == losses(tmp_path / "reference")  # bitwise
    a = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

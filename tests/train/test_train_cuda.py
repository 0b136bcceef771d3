"""GPU paths of the trainer: bf16 autocast + torch.compile + fused AdamW, fp16 with a gradient scaler,
and exact resume with the CUDA RNG (dropout) in play. Run with `pytest -m cuda tests/train`."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import toy_trainer

pytestmark = pytest.mark.cuda


def test_bf16_compiled_training_follows_fp32_and_reports_mfu(tmp_path):
    common = dict(device="cuda", max_steps=40, batch_size=8, seq_len=64, schedule="constant")
    fp32 = toy_trainer(tmp_path / "fp32", precision="fp32", compile=False, **common)
    bf16 = toy_trainer(tmp_path / "bf16", precision="auto", compile=None, **common)
    assert bf16.precision == "bf16" and bf16.model is not bf16.raw_model  # compiled by default on CUDA
    assert bf16.optimizer.defaults["fused"]
    a = [fp32.train_step() for _ in range(30)]
    b = [bf16.train_step() for _ in range(30)]
    assert b[-1] < b[0] - 1.0  # it learns
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.1  # bf16 rounding only
    summary = bf16.fit()  # the last 10 steps through fit(): logged, with tokens/s and MFU
    if bf16.peak_flops:  # a GPU with a known peak (H100, A100, ...)
        assert "MFU" in summary


def test_fp16_uses_a_gradient_scaler(tmp_path):
    trainer = toy_trainer(tmp_path, device="cuda", precision="fp16", compile=False, max_steps=10)
    assert trainer.scaler.is_enabled()
    losses = [trainer.train_step() for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_exact_resume_on_cuda_with_dropout(tmp_path):
    settings = dict(device="cuda", compile=False, dropout=0.1, max_steps=8, save_every=4, resume=True)
    full = toy_trainer(tmp_path / "full", **settings)
    expected = [full.train_step() for _ in range(8)]
    first = toy_trainer(tmp_path / "cut", **settings)
    for _ in range(4):
        first.train_step()
    first.save_checkpoint()
    resumed = toy_trainer(tmp_path / "cut", **settings)
    assert resumed.step == 4
    got = [resumed.train_step() for _ in range(4)]
    assert max(abs(x - y) for x, y in zip(expected[4:], got)) <= 1e-6


def test_nonfinite_steps_are_skipped_on_the_gpu_without_a_host_wait(tmp_path):
    # bf16 + fused AdamW: the skip is AdamW's found_inf on the device; the loss comes back through
    # pinned memory behind an event, read one step late
    trainer = toy_trainer(tmp_path, device="cuda", precision="bf16", compile=False, max_nonfinite_steps=5)
    assert trainer.skip_on_device
    poison = {"on": False}
    trainer.raw_model.embed.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    trainer.train_step()
    weights = [p.detach().clone() for p in trainer.raw_model.parameters()]
    poison["on"] = True
    trainer.launch_step()
    trainer.launch_step()
    assert math.isnan(trainer.settle(keep=1)) and len(trainer._pending) == 1  # the older one only
    assert math.isnan(trainer.settle())
    assert trainer.nonfinite_in_a_row == 2 and not trainer._pending
    assert all(torch.equal(a, p) for a, p in zip(weights, trainer.raw_model.parameters()))
    poison["on"] = False
    assert torch.isfinite(torch.tensor(trainer.train_step()))
    assert trainer.nonfinite_in_a_row == 0

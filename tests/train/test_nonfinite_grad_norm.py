"""A finite loss with a non-finite gradient (one overflowing entry) skips the step like a non-finite
loss: clipping would otherwise scale every gradient by 0 (inf * 0 = NaN) and AdamW would write NaN
into the weights, which the next checkpoint would save as good."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import toy_trainer

import lmstack
from lmstack.errors import TrainingError
from lmstack.train.logging import RunLogger


def poison_gradient(trainer) -> dict:
    """While on["on"], one row of one weight's gradient is inf (as an fp16 overflow would leave it)."""
    on = {"on": False}
    weight = trainer.raw_model.layers[0].mlp.down.weight
    weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")) if on["on"] else g)
    return on


def snapshot(trainer):
    weights = [p.detach().clone() for p in trainer.raw_model.parameters()]
    moments = [t.clone() for state in trainer.optimizer.state.values() for t in state.values()]
    return weights, moments


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def logging_to(trainer, tmp_path):
    """The trainer's messages go to stderr outside fit() too."""
    trainer.log = RunLogger(tmp_path / "log", True, 100, 0, progress=False, tensorboard=False)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("on_device", [True, False], ids=["fused-found_inf", "host-check"])
def test_a_nonfinite_gradient_norm_skips_the_step(tmp_path, capsys, on_device, grad_clip):
    trainer = toy_trainer(tmp_path, max_steps=20, grad_clip=grad_clip)
    assert trainer.skip_on_device  # a fused AdamW on CPU, no fp16 scaler, no FSDP
    trainer.skip_on_device = on_device
    logging_to(trainer, tmp_path)
    poison = poison_gradient(trainer)
    trainer.train_step()
    before = snapshot(trainer)
    poison["on"] = True
    loss = trainer.train_step()
    poison["on"] = False
    assert math.isnan(loss)  # train_step returns nan for a skipped step; the warning holds its finite loss
    assert not math.isfinite(float(trainer.grad_norm))
    assert trainer.nonfinite_in_a_row == 1 and trainer.step == 2
    # weights, AdamW's moments and its step count did not move; no NaN gradient is left behind
    assert same(before[0], snapshot(trainer)[0]) and same(before[1], snapshot(trainer)[1])
    assert all(p.grad is None for p in trainer.raw_model.parameters())
    assert "warning: step 2: gradient norm is inf" in capsys.readouterr().err
    # a checkpoint written now holds the last good weights
    path = trainer.save_checkpoint()
    saved, _ = lmstack.load(path)
    assert same(before[0], [p.detach() for p in saved.parameters()])
    # the next good step trains on and resets the count
    assert math.isfinite(trainer.train_step())
    assert trainer.nonfinite_in_a_row == 0
    assert not same(before[0], snapshot(trainer)[0])
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_fit_skips_a_nonfinite_gradient_norm_and_stops_after_a_streak(tmp_path, capsys):
    trainer = toy_trainer(tmp_path / "one", max_steps=6, save_every=3)
    poison = poison_gradient(trainer)
    launch = trainer.launch_step

    def launch_poisoned_at_3():
        poison["on"] = trainer.step == 2  # the step numbered 3
        launch()

    trainer.launch_step = launch_poisoned_at_3
    summary = trainer.fit()  # finishes, and plots a metrics file that holds a skipped step
    assert summary["steps"] == 6 and math.isfinite(summary["final train loss"])
    assert "warning: step 3: gradient norm is inf" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    # no checkpoint at the skipped step 3 (the periodic save waits for a good step); the final one is finite
    assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) == ["step-00000006"]
    final, _ = lmstack.load(tmp_path / "one" / "checkpoints" / "step-00000006")
    assert all(torch.isfinite(p).all() for p in final.parameters())

    trainer = toy_trainer(tmp_path / "streak", max_steps=20, save_every=2, max_nonfinite_steps=3)
    poison = poison_gradient(trainer)
    launch = trainer.launch_step

    def launch_poisoned_from_3():
        poison["on"] = trainer.step >= 2
        launch()

    trainer.launch_step = launch_poisoned_from_3
    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row.*gradient norm.*step-00000002"):
        trainer.fit()
    kept, _ = lmstack.load(tmp_path / "streak" / "checkpoints" / "step-00000002")
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_fp16_overflow_is_the_scalers_calibration_until_the_scale_reaches_one(tmp_path, capsys):
    """fp16: gradients that overflow at loss scale > 1 are the GradScaler's business (skip, halve the
    scale), not counted; at a scale <= 1 the gradient itself is not finite: a counted skip."""
    trainer = toy_trainer(tmp_path, max_steps=20, precision="fp16")
    assert trainer.scaler.is_enabled() and not trainer.skip_on_device
    logging_to(trainer, tmp_path)
    poison = poison_gradient(trainer)
    trainer.train_step()
    scale = trainer.scaler.get_scale()
    before = snapshot(trainer)
    poison["on"] = True
    assert math.isfinite(trainer.train_step())
    assert trainer.scaler.get_scale() == scale / 2 and trainer.nonfinite_in_a_row == 0
    assert same(before[0], snapshot(trainer)[0]) and same(before[1], snapshot(trainer)[1])
    assert f"fp16 gradients overflowed at loss scale {scale:g}" in capsys.readouterr().err
    trainer.scaler.update(new_scale=1.0)
    trainer.train_step()
    assert trainer.nonfinite_in_a_row == 1
    assert same(before[0], snapshot(trainer)[0]) and same(before[1], snapshot(trainer)[1])
    assert "warning: step 3: gradient norm is inf" in capsys.readouterr().err
    poison["on"] = False
    trainer.train_step()
    assert trainer.nonfinite_in_a_row == 0
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_a_skipped_last_step_is_not_the_final_train_loss(tmp_path):
    """A step skipped for its gradient norm logs its (finite) loss, but the run's summary and plot
    report the losses of updates that happened."""
    trainer = toy_trainer(tmp_path, max_steps=4, log_every=1)
    poison = poison_gradient(trainer)
    launch = trainer.launch_step

    def launch_poisoned_last():
        poison["on"] = trainer.step == 3  # the step numbered 4, the last
        launch()

    trainer.launch_step = launch_poisoned_last
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = {r["step"]: r["loss"] for r in records if r.get("loss") is not None and not r.get("skipped")}
    assert [r["step"] for r in records if r.get("skipped")] == [4]
    assert summary["final train loss"] == trained[3]

"""Checkpoints are HF directories + trainer_state/, atomic, pruned to keep_last; runs leave their records."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import Crash, crash_at, toy_trainer

from lmstack.checkpoint.state import latest_checkpoint, list_checkpoints, load_trainer_state
from lmstack.errors import CheckpointError
from lmstack.train import distributed as D


def test_run_leaves_checkpoints_model_metrics_plot_and_report(tmp_path):
    from transformers import LlamaForCausalLM

    trainer = toy_trainer(tmp_path, max_steps=8, save_every=2, keep_last=2, eval_every=4)
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-00000099").mkdir()  # left by a run killed while saving
    assert latest_checkpoint(tmp_path) is None
    summary = trainer.fit()

    assert [step for step, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state = load_trainer_state(tmp_path / "checkpoints" / "step-00000008")  # weights_only=True inside
    assert state["step"] == 8 and state["data"] == [{"calls": 8}] and state["world_size"] == 1
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"} and "optimizer" in state
    assert (tmp_path / "checkpoints" / "step-00000008" / "trainer_state" / "train_config.yaml").is_file()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert summary["val loss"] == records[-1]["val_loss"] and summary["steps"] == 8
    assert (tmp_path / "loss.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "val loss" in report and "loss.png" in report

    # the exported model is a plain HF directory: transformers' logits equal the trained model's
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = trainer.raw_model.eval()(ids).logits
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_corrupt_trainer_state_is_a_clear_error(tmp_path):
    toy_trainer(tmp_path, max_steps=2).fit()
    path = tmp_path / "checkpoints" / "step-00000002" / "trainer_state" / "state.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not be read as trainer state.*delete this checkpoint"):
        toy_trainer(tmp_path, max_steps=4, resume=True)


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")  # optional: logged only when installed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toy_trainer(tmp_path, max_steps=4, eval_every=2, tensorboard=True).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records if "loss" in r])
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_resume_says_which_newer_step_directories_it_passes_over(tmp_path, capsys):
    toy_trainer(tmp_path, max_steps=2, save_every=2).fit()
    manual = tmp_path / "checkpoints" / "step-00000005"
    manual.mkdir()  # e.g. an HF export copied here by hand: weights but no trainer state
    (manual / "config.json").write_text("{}")
    capsys.readouterr()
    trainer = toy_trainer(tmp_path, max_steps=4, resume=True)
    err = capsys.readouterr().err
    assert trainer.step == 2
    assert f"--resume passes over {manual}: no trainer_state/state.pt there" in err
    assert "resuming from step-00000002" in err and "move it out of checkpoints/ to keep it" in err


def test_resume_with_another_vocab_padding_is_refused(tmp_path):
    # config.json holds the real vocabulary, but the optimizer's moments have the padded rows
    toy_trainer(tmp_path, max_steps=2, pad_vocab_to_multiple=64).fit()
    with pytest.raises(CheckpointError, match=r"step-00000002 pads the vocabulary to 256 rows \(pad_vocab_to_multiple"
                                              r"=64\) but this run pads it to 300 \(pad_vocab_to_multiple=100\); "
                                              r"resume with --pad_vocab_to_multiple 64"):
        toy_trainer(tmp_path, max_steps=4, resume=True, pad_vocab_to_multiple=100)


def test_optimizer_state_of_another_shape_is_refused(tmp_path):
    # torch does not check: the fused AdamW would write past the end of the smaller moment
    trainer = toy_trainer(tmp_path)
    trainer.train_step()
    state = D.full_optimizer_state(trainer.raw_model, trainer.optimizer)
    state["state"]["embed.weight"]["exp_avg"] = torch.zeros(200, 64)
    with pytest.raises(CheckpointError, match=r"optimizer state exp_avg of parameter embed.weight in step-7 has "
                                              r"shape \(200, 64\) but the parameter has shape \(256, 64\)"):
        D.load_optimizer_state(trainer.raw_model, trainer.optimizer, state, source="step-7")


def test_resume_takes_optimizer_settings_from_the_new_config(tmp_path):
    toy_trainer(tmp_path, max_steps=2).fit()  # weight_decay 0.1, betas (0.9, 0.95), eps 1e-8
    changed = dict(weight_decay=0.5, beta1=0.8, beta2=0.99, adam_eps=1e-6)
    resumed = toy_trainer(tmp_path, max_steps=4, resume=True, **changed)
    fresh = toy_trainer(tmp_path / "fresh", **changed)  # the groups a run started with these options has
    assert resumed.step == 2 and resumed.optimizer.state  # the moments were loaded
    settings = [[(g["weight_decay"], g["betas"], g["eps"]) for g in t.optimizer.param_groups] for t in (resumed, fresh)]
    assert settings[0] == settings[1] == [(0.5, (0.8, 0.99), 1e-6), (0.0, (0.8, 0.99), 1e-6)]


def test_best_validation_loss_survives_a_resume(tmp_path):
    # a high constant lr makes the validation loss rise: the best one is before the checkpoint resumed from
    settings = dict(max_steps=6, eval_every=2, save_every=4, resume=True, lr=0.3, warmup_steps=0, schedule="constant")
    full = toy_trainer(tmp_path / "full", **settings).fit()
    with pytest.raises(Crash):
        crash_at(toy_trainer(tmp_path / "cut", **settings), 5).fit()
    resumed = toy_trainer(tmp_path / "cut", **settings)
    assert resumed.step == 4
    summary = resumed.fit()
    assert full["best val step"] < 4 and full["best val loss"] < full["val loss"]
    for key in ("val loss", "best val loss", "best val step"):
        assert summary[key] == full[key], key
    best = [[line for line in (tmp_path / run / "report.md").read_text().splitlines() if "best val" in line]
            for run in ("full", "cut")]
    assert len(best[0]) == 2 and best[0] == best[1]

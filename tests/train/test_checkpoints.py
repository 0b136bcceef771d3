"""Checkpoints are HF directories + trainer_state/, atomic, pruned to keep_last; runs leave their records."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import toy_trainer

from lmstack.checkpoint.state import latest_checkpoint, list_checkpoints, load_trainer_state
from lmstack.errors import CheckpointError


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

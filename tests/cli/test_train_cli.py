"""`lmstack pretrain / finetune / quickstart`: help, flags from TrainConfig, and the example configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lmstack.cli import main
from lmstack.train import TrainConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_every_training_option_is_a_flag_with_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        if f.name != "task":
            assert f"--{f.name}" in out, f.name
    assert "--config" in out and "default: runs/pretrain" in out and "Peak learning rate" in out
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "--method full" in out and "default: 2e-05" in out
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    assert "small code model" in capsys.readouterr().out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_are_valid(path, capsys):
    options = yaml.safe_load(path.read_text())
    command = "finetune" if options.pop("method", None) else "pretrain"
    TrainConfig.from_dict(options)  # every key is a known option with a valid value
    with pytest.raises(SystemExit) as exc:
        main([command, "--config", str(path), "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seq_len"] == options["seq_len"] and printed["out_dir"] == options["out_dir"]



def test_finetune_without_a_model_says_it_needs_a_trained_one(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n')
    code = main(["finetune", "--data", str(chats), "--out_dir", str(tmp_path / "run"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--model has none (a preset, or a directory without tokenizer.json)" in err
    assert "pass --model DIR, a trained Hugging Face model with its tokenizer" in err

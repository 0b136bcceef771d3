"""Bad input gives a clear LmstackError naming the option, file or value, before any work starts."""

from __future__ import annotations

import pytest
import torch
from toy_data import ToyTokenDataset
from train_helpers import ListData, tiny_config, toy_trainer

import lmstack
from lmstack.cli import main
from lmstack.errors import CheckpointError, ConfigError, DataError
from lmstack.train import TrainConfig, Trainer


def test_unknown_config_key_in_yaml_is_rejected_by_the_cli(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"out_dir: {tmp_path / 'out'}\nlerning_rate: 0.1\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    assert f"--config {config}: key 'lerning_rate' is not an option of `lmstack pretrain`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_python_config(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.1\nwarmup: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown training option\(s\) \['warmup'\].*warmup_steps"):
        TrainConfig.from_yaml(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="model_overrides.*unknown ModelConfig field.*num_layer"):
        toy_trainer(tmp_path, model_overrides={"num_layer": 3})


def test_overrides_no_checkpoint_could_hold_are_refused_before_training(tmp_path):
    # Llama's config.json has one attention_bias switch for q/k/v and o: q/k/v alone would be lost
    with pytest.raises(ConfigError, match=r"could not be saved as a Hugging Face checkpoint: attn_qkv_bias=True "
                                          r"\(a LlamaForCausalLM config.json loads it as False\)"):
        toy_trainer(tmp_path, model_overrides={"attn_qkv_bias": True})
    assert not (tmp_path / "checkpoints").exists()


def test_gpt2_without_biases_trains_saves_and_resumes(tmp_path):
    """nanoGPT's bias=False: GPT-2's layout always has biases, so they are saved as zeros."""
    overrides = {"attn_qkv_bias": False, "attn_out_bias": False, "mlp_bias": False}
    toy_trainer(tmp_path, model="tiny-gpt2", model_overrides=overrides, max_steps=3, save_every=3).fit()
    resumed = toy_trainer(tmp_path, model="tiny-gpt2", model_overrides=overrides, max_steps=4, resume=True)
    assert resumed.step == 3 and resumed.raw_model.layers[0].attn.qkv.bias is None


def test_missing_data_directory(tmp_path, capsys):
    code = main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "data directory" in err and "nowhere" in err and "does not exist" in err and "lmstack data prepare" in err
    assert not (tmp_path / "out").exists()
    code = main(["finetune", "--model", "tiny-llama", "--data", str(tmp_path / "chats.jsonl")])
    assert code == 2 and "--data " in (err := capsys.readouterr().err) and "chats.jsonl does not exist" in err
    (tmp_path / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code = main(["finetune", "--model", "tiny-llama", "--data", str(tmp_path / "chats.jsonl"),
                 "--val_data", str(tmp_path / "val.jsonl")])
    assert code == 2 and "--val_data " in (err := capsys.readouterr().err) and "val.jsonl does not exist" in err
    # a model path that does not exist is named as such, not as a model "without a tokenizer"
    code = main(["finetune", "--model", str(tmp_path / "nosuch"), "--data", str(tmp_path / "chats.jsonl"),
                 "--out_dir", str(tmp_path / "ft")])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "nosuch does not exist" in err and "presets:" in err, err


@pytest.mark.parametrize("change, message", [
    (dict(lr=-1.0), "lr must be >= 0"), (dict(min_lr=0.1, lr=0.01), "min_lr=0.1 is above lr=0.01"),
    (dict(batch_size=0), "batch_size must be a positive integer"), (dict(schedule="linear"), "schedule='linear'"),
])
def test_out_of_range_options(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **change)


def test_batch_that_does_not_fit_the_context(tmp_path):
    with pytest.raises(ConfigError, match=r"seq_len=512 does not fit the model's context.*256.*--seq_len 256 or less"):
        toy_trainer(tmp_path, seq_len=512)
    # a loader that hands out longer rows than configured is stopped before the first update
    long = torch.randint(0, 256, (2, 300))
    trainer = Trainer(tiny_config(tmp_path), train_data=ListData([(long, long)]))
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    with pytest.raises(DataError, match="a batch of 300 tokens does not fit the model's context of 256"):
        trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))


def test_checkpoint_from_another_model_shape(tmp_path):
    toy_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(CheckpointError, match=r"step-00000002 is from another model shape: num_layers=2 in the "
                                              r"checkpoint but 3 configured"):
        toy_trainer(tmp_path, max_steps=4, resume=True, model_overrides={"num_layers": 3})
    # and a finished run is not silently overwritten by a new one
    with pytest.raises(ConfigError, match="already has checkpoints.*--resume true"):
        toy_trainer(tmp_path, max_steps=4)


def test_data_vocabulary_larger_than_the_model(tmp_path):
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(DataError, match="vocabulary of 300 tokens but model .* has vocab_size=256"):
        Trainer(tiny_config(tmp_path / "out", model=str(tmp_path / "m")),
                train_data=ToyTokenDataset(16, vocab_size=300))


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_a_seed_numpy_cannot_take_is_refused_up_front(tmp_path, seed):
    with pytest.raises(ConfigError, match=rf"seed must be an integer in \[0, 2\*\*32\), got {seed}"):
        tiny_config(tmp_path, seed=seed)
    assert tiny_config(tmp_path, seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_size": "256"}, "model_overrides hidden_size must be a positive integer, got '256'"),
    ({"hidden_size": None}, "model_overrides hidden_size must be a positive integer, got None"),
    ({"num_heads": "4"}, "model_overrides num_heads must be a positive integer, got '4'"),
    ({"num_heads": 2.0}, "model_overrides num_heads must be a positive integer, got 2.0"),
])
def test_model_overrides_that_are_not_integers_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        toy_trainer(tmp_path, model_overrides=overrides)


@pytest.mark.parametrize("option, value", [("dropout", 0.2), ("pad_vocab_to_multiple", 100),
                                           ("model_overrides", {"num_layers": 1})])
def test_model_options_with_a_model_object_are_refused(tmp_path, option, value):
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    with pytest.raises(ConfigError, match=rf"{option}=.* has no effect on a model passed as Trainer\(model=...\), "
                                          rf"which trains as built; leave {option} unset"):
        Trainer(tiny_config(tmp_path, **{option: value}), model=model, train_data=ToyTokenDataset(16))
    trainer = Trainer(tiny_config(tmp_path), model=model, train_data=ToyTokenDataset(16))  # defaults are fine
    assert trainer.raw_model is model


def test_a_run_without_validation_data_says_so(tmp_path, capsys):
    rows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    Trainer(tiny_config(tmp_path), train_data=ListData([(rows, rows)]))
    err = capsys.readouterr().err
    assert "warning: no validation data, so this run reports no validation loss" in err
    assert "--val_fraction > 0, or pass --val_data DIR" in err


def test_seq_len_none_takes_the_model_context_up_to_1024(tmp_path):
    """finetune's default: a 256-position model trains at 256, a 2048-position one at 1024."""
    rows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    small = Trainer(tiny_config(tmp_path / "a", seq_len=None), train_data=ListData([(rows, rows)]))
    assert small.config.seq_len == 256
    large = Trainer(tiny_config(tmp_path / "b", seq_len=None, model_overrides={"max_position_embeddings": 2048}),
                    train_data=ListData([(rows, rows)]))
    assert large.config.seq_len == 1024


def test_the_context_is_checked_before_the_data(tmp_path, capsys):
    """A seq_len beyond the model's context used to be reported as data too short for one window."""
    code = main(["pretrain", "--model", "tiny-llama", "--seq_len", "100000", "--data", str(tmp_path / "nowhere"),
                 "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "seq_len=100000 does not fit the model's context (max_position_embeddings=256)" in err, err
